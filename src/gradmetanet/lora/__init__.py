"""Learning on LoRAs: adapter weights as data (PEFT files in and out), with a GL(r) space per layer."""

from .sets import LoraBatch, LoraLayer, LoraSet, UnsupportedAdapterError

__all__ = ["LoraBatch", "LoraLayer", "LoraSet", "UnsupportedAdapterError"]
