"""``fit``: one loop for every metanetwork and container, with a test split that selection never sees."""

from __future__ import annotations

import pytest
import torch

from gradmetanet import NetworkSpec
from gradmetanet.training import fit, fit_regression
from gradmetanet.weightspace import DWSNet, WeightSpaceFeatures


def weight_space_task(m: int = 200):
    """Networks of a 3-5-2 chain; the target is each network's mean squared weight (an invariant)."""
    spec = NetworkSpec.chain([3, 5, 2], activation="tanh")
    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(m, generator=gen) + 0.5
    tensors = {k: torch.randn(m, *s, 1, generator=gen) * scale.view(-1, *[1] * (len(s) + 1))
               for k, s in spec.param_shapes().items()}
    target = torch.stack([sum(t[i].square().sum() for t in tensors.values()) for i in range(m)]).unsqueeze(1)
    return spec, WeightSpaceFeatures(spec, tensors), (target - target.mean()) / target.std()


def test_fit_trains_a_weight_space_backbone_and_reports_an_unseen_test_split(monkeypatch):
    spec, features, y = weight_space_task()
    seen = {}
    real = fit_regression

    def spy(model, predict, targets, train_idx, val_idx, test_idx, *args, **kwargs):
        seen.update(train=set(train_idx.tolist()), val=set(val_idx.tolist()), test=set(test_idx.tolist()))
        return real(model, predict, targets, train_idx, val_idx, test_idx, *args, **kwargs)
    monkeypatch.setattr("gradmetanet.training.fit_regression", spy)
    torch.manual_seed(0)
    model = DWSNet(spec, 1, 1, hidden=8, layers=2, readout="invariant")
    result = fit(model, features, y, epochs=40, lr=1e-2, progress=False)
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert len(seen["test"]) == 40 and len(seen["val"]) == 40
    assert result.test != result.best_val
    assert result.test < 0.5 * y.var().item(), result.test          # learned, on networks it never saw


def test_fit_refuses_targets_of_the_wrong_length_and_empty_training_sets():
    spec, features, y = weight_space_task(10)
    model = DWSNet(spec, 1, 1, hidden=4, layers=1, readout="invariant")
    with pytest.raises(ValueError, match=r"one row per network \(10\)"):
        fit(model, features, y[:9], progress=False)
    with pytest.raises(ValueError, match="nothing to train on"):
        fit(model, features, y, val_fraction=0.5, test_fraction=0.5, progress=False)
