"""Zoos of networks on disk: the one cache every zoo goes through, and sharded zoo folders that several processes
fill and training reads shard by shard (the zoo types themselves are in ``data``)."""

from .cache import cached_zoo, default_cache_dir, list_zoos, verify_zoo_folder
from .shards import ShardedZoo, ZooDamaged, make_sharded_zoo

__all__ = ["ShardedZoo", "ZooDamaged", "cached_zoo", "default_cache_dir", "list_zoos", "make_sharded_zoo",
           "verify_zoo_folder"]
