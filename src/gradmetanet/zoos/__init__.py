"""Zoos of networks: the one on-disk cache every zoo goes through (the zoo types themselves are in ``data``)."""

from .cache import cached_zoo, default_cache_dir, list_zoos, verify_zoo_folder

__all__ = ["cached_zoo", "default_cache_dir", "list_zoos", "verify_zoo_folder"]
