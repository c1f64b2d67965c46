"""What metanetworks read, each carrying its spec: weight-space features (state dicts, flat vectors, the NFN and
DWSNets layouts), the graph view of a network (convolutions too), function-preserving changes of networks (random
symmetries, widening), Lemma 1's gauge count, and every spec-aware normaliser."""

from .graph import NetworkGraph
from .neurons import GradientBatch
from .normalise import GradientScale, NeuronNormaliser, WeightSpaceNormaliser, space_rms
from .transforms import random_symmetry, widen
from .weightspace import WeightSpaceFeatures, flatten_weights, unflatten_weights

__all__ = ["GradientBatch", "GradientScale", "NetworkGraph", "NeuronNormaliser", "WeightSpaceFeatures", "WeightSpaceNormaliser",
           "flatten_weights", "random_symmetry", "space_rms", "unflatten_weights", "widen"]
