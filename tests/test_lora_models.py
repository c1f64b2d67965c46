"""Models on LoRA weights through the symmetry harness: GL(r) per layer, independently."""

from __future__ import annotations

import pytest
import torch

from gradmetanet.lora import DenseMLP, GLNet, LoraBatch, LoraLayer, LoraSet, RawMLP, SpectrumMLP
from gradmetanet.testing import check_symmetry

SHAPES = {"blocks.0.q": (6, 5), "blocks.0.v": (4, 6), "blocks.1.q": (6, 5)}


def random_batch(n: int = 5, rank: int = 3, seed: int = 0) -> LoraBatch:
    gen = torch.Generator().manual_seed(seed)
    sets = [LoraSet(tuple(LoraLayer(p, torch.randn(rank, inp, generator=gen, dtype=torch.float64),
                                    torch.randn(out, rank, generator=gen, dtype=torch.float64), 0.5)
                          for p, (out, inp) in SHAPES.items())) for _ in range(n)]
    return LoraBatch.stack(sets)


def move(batch: LoraBatch, element, spec):
    return batch.transform(element)


MODELS = {
    "glnet": lambda: GLNet(SHAPES, 3, hidden=8, layers=3),
    "glnet_dropout": lambda: GLNet(SHAPES, 3, hidden=8, layers=2, dropout=0.3),
    "dense": lambda: DenseMLP(SHAPES, 3, hidden=16),
    "dense_sketched": lambda: DenseMLP(SHAPES, 3, hidden=16, sketch=16),
    "spectrum": lambda: SpectrumMLP(SHAPES, 3, rank=3, hidden=16),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_invariant_models_pass_the_harness(name):
    """Outputs unchanged under an independent GL(r) element per layer (float64, well conditioned); permuting
    a layer's input neurons (a change of dW) changes them."""
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    batch = random_batch()
    # singular values are also invariant to permuting a layer's neurons (an orthogonal map): lossy by design
    breakers = () if name == "spectrum" else ("fixed",)
    with torch.no_grad():
        check_symmetry(batch.spec(), model, batch, move, lambda y, g, sp: y, trials=3, atol=1e-8,
                       sensitivity=breakers)
        scaled = LoraBatch(batch.paths, {p: 2 * a if p == "blocks.0.q" else a for p, a in batch.A.items()},
                           batch.B, batch.scaling)
        assert (model(scaled) - model(batch)).abs().max() > 1e-6          # a different dW, a different output


def test_raw_factor_mlp_is_not_invariant():
    torch.manual_seed(0)
    model = RawMLP(SHAPES, 3, rank=3, hidden=16).double()
    batch = random_batch()
    with torch.no_grad(), pytest.raises(AssertionError, match="not equivariant"):
        check_symmetry(batch.spec(), model, batch, move, lambda y, g, sp: y)


def test_elements_act_independently_per_layer():
    """One layer moved, the others not: GL-net's output is unchanged (each layer has its own group)."""
    torch.manual_seed(0)
    model = GLNet(SHAPES, 2, hidden=8).double().eval()
    batch = random_batch()
    g = batch.spec().sample(torch.Generator().manual_seed(3))
    only = {"blocks.0.v:rank": g["blocks.0.v:rank"]}
    with torch.no_grad():
        torch.testing.assert_close(model(batch.transform(only)), model(batch), atol=1e-9, rtol=0)


def test_glnet_runs_on_an_unseen_rank_and_the_rank_bound_models_refuse():
    torch.manual_seed(0)
    model = GLNet(SHAPES, 2, hidden=8).double()
    assert model(random_batch(rank=4)).shape == (5, 2) and model(random_batch(rank=8)).shape == (5, 2)
    with pytest.raises(ValueError, match="rank 3"):
        RawMLP(SHAPES, 2, rank=3).double()(random_batch(rank=8))
    with pytest.raises(ValueError, match="built for layers"):
        GLNet({"other": (3, 3)}, 2)(random_batch())


def test_gate_matches_the_formed_product():
    u, v = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    gu, gv = GLNet.gate(u, v)
    z = u @ v.transpose(1, 2)
    torch.testing.assert_close(gu, u * (z.sum(2, keepdim=True) > 0))
    torch.testing.assert_close(gv, v * (z.sum(1).unsqueeze(-1) > 0))


def test_aligned_mlp_removes_rotations_but_not_all_of_gl():
    """Procrustes alignment to a template makes the MLP invariant to O(r) per layer (here: permutations and
    signs of the rank components), not to GL(r)."""
    from gradmetanet.core import Monomial
    from gradmetanet.lora import AlignMLP

    torch.manual_seed(0)
    batch = random_batch()
    model = AlignMLP(SHAPES, 2, rank=3, template=random_batch(n=1, seed=5), hidden=16).double()
    perm = {f"{p}:rank": Monomial(torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
            for p in SHAPES}
    with torch.no_grad():
        torch.testing.assert_close(model(batch.transform(perm)), model(batch), atol=1e-8, rtol=0)
        with pytest.raises(AssertionError, match="not equivariant"):
            check_symmetry(batch.spec(), model, batch, move, lambda y, g, sp: y)
