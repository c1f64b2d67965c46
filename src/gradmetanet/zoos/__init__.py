"""Model zoos: the SIREN, INR, classifier and LoRA zoos, made by one vectorised trainer (``optim``), read through
one cache with a manifest and checksums (``cache``) or from sharded folders that several processes fill and
training reads shard by shard (``shards``); the zoo objective of one-shot fine-tuning and its SGD baseline."""

from .cache import cached_zoo, default_cache_dir, list_zoos, verify_zoo_folder
from .classifier import ClassifierZoo, ClassifierZooConfig, load_or_generate_classifier_zoo
from .inr import InrZoo, InrZooConfig, load_or_generate_inr_zoo
from .lora import AdapterZoo, LoraZoo, LoraZooConfig, load_or_generate_lora_zoo
from .lora_lm import LmLoraZoo, LmLoraZooConfig, load_or_generate_lm_lora_zoo
from .public_inrs import PublicInrSource, load_public_inr_zoo, public_inrs_to_shards
from .objective import ZooMetrics, evaluate_networks, l1_norms, objective
from .optim import adam_step, heavy_ball_step
from .sgd import sgd_finetune
from .shards import ShardedGradients, ShardedWeights, ShardedZoo, ZooDamaged, make_sharded_zoo
from .siren import SirenZoo, SirenZooConfig, load_or_generate_siren_zoo

__all__ = ["AdapterZoo", "ClassifierZoo", "ClassifierZooConfig", "InrZoo", "InrZooConfig", "LmLoraZoo",
           "LmLoraZooConfig", "LoraZoo", "LoraZooConfig", "PublicInrSource", "ShardedGradients", "ShardedWeights", "ShardedZoo", "SirenZoo", "SirenZooConfig", "ZooDamaged",
           "ZooMetrics", "adam_step", "cached_zoo", "default_cache_dir", "evaluate_networks", "heavy_ball_step",
           "l1_norms", "list_zoos", "load_or_generate_classifier_zoo", "load_or_generate_inr_zoo",
           "load_or_generate_lm_lora_zoo", "load_or_generate_lora_zoo", "load_or_generate_siren_zoo", "load_public_inr_zoo",
           "make_sharded_zoo", "objective", "public_inrs_to_shards", "sgd_finetune", "verify_zoo_folder"]
