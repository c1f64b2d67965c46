"""gradmetanet.testing, the public symmetry harness: it passes the library's metanetworks and fails broken ones."""

import pytest
import torch

from gradmetanet import GradientBatch, NetworkSpec
from gradmetanet.metanets import GradMetaNet, GradMetaNetPlusPlus
from gradmetanet.testing import check_metanetwork

SPEC = NetworkSpec.chain([3, 6, 6, 2], activation="tanh")


@pytest.mark.parametrize("make", [lambda: GradMetaNet(hidden=8), lambda: GradMetaNetPlusPlus(hidden=8, heads=2)],
                         ids=["gradmetanet", "gradmetanet++"])
def test_the_library_metanetworks_pass(make):
    torch.manual_seed(0)
    check_metanetwork(make(), SPEC, group="perm", sensitivity=("fixed", "swap"))


class _Codeless(torch.nn.Module):
    """Neuron features pooled over each space, no codes: equivariant, but blind to which space is which."""

    def forward(self, batch: GradientBatch) -> torch.Tensor:
        return torch.stack([batch.features[:, :, sl].mean((1, 2)).sum(-1) for sl in batch.spec.space_slices().values()
                            if sl.stop - sl.start == 6], -1).sort(-1).values


class _NeuronZeroOnly(torch.nn.Module):
    """Reads the first neuron of every hidden space: not permutation-equivariant."""

    def forward(self, batch: GradientBatch) -> torch.Tensor:
        return torch.stack([batch.features[:, :, sl.start].mean(1).sum(-1) for sl in batch.spec.space_slices().values()],
                           -1)


def test_a_model_blind_to_the_spaces_fails_the_swap_breaker():
    check_metanetwork(_Codeless(), SPEC, group="perm")           # equivariant (invariant) and set-invariant
    with pytest.raises(AssertionError, match="insensitive to breaker 'swap'"):
        check_metanetwork(_Codeless(), SPEC, group="perm", sensitivity=("swap",))


def test_the_full_group_is_checked_by_default():
    """GradMetaNet on raw (a, g) promises permutations only: the default full group (signs of tanh) fails it."""
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="group full"):
        check_metanetwork(GradMetaNet(hidden=8), SPEC)


def test_a_model_that_reads_one_neuron_fails_equivariance():
    with pytest.raises(AssertionError, match="not equivariant"):
        check_metanetwork(_NeuronZeroOnly(), SPEC, group="perm")
