"""Learning on LoRAs: adapter weights as data (PEFT files in and out), with a GL(r) space per layer."""

from .models import AlignMLP, DenseMLP, GLNet, RawMLP, SpectrumMLP
from .sets import LoraBatch, LoraLayer, LoraSet, UnsupportedAdapterError, lora_spec

__all__ = ["AlignMLP", "DenseMLP", "GLNet", "LoraBatch", "LoraLayer", "LoraSet", "RawMLP", "SpectrumMLP", "UnsupportedAdapterError",
           "lora_spec"]
