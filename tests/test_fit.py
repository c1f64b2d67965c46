"""``fit``: one loop for every metanetwork and container, with a test split that selection never sees."""

from __future__ import annotations

import pytest
import torch

from gradmetanet import NetworkSpec
from gradmetanet.metanets.training import fit, fit_regression
from gradmetanet.features import WeightSpaceFeatures
from gradmetanet.metanets import DWSNet


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
    monkeypatch.setattr("gradmetanet.metanets.training.fit_regression", spy)
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


def _linear_task(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(120, 4, generator=gen)
    y = x @ torch.randn(4, 1, generator=gen)
    return x, y, torch.arange(80), torch.arange(80, 100), torch.arange(100, 120)


def test_patience_stops_a_fit_that_no_longer_improves_and_calls_it_converged():
    """With a zero learning rate validation never improves after the first epoch: the fit stops `patience` epochs
    later, keeps the first epoch's model, and reports convergence."""
    x, y, train, val, test = _linear_task()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    result = fit_regression(model, lambda m, idx: m(x[idx]), y, train, val, test, epochs=50, batch_size=16,
                            lr=1e-12, seed=0, patience=3)
    assert result.epochs_run == 4 and len(result.val_history) == 4
    assert result.best_epoch == 0 and result.converged


def test_a_fit_stopped_at_its_cap_while_improving_is_not_converged():
    x, y, train, val, test = _linear_task()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    result = fit_regression(model, lambda m, idx: m(x[idx]), y, train, val, test, epochs=6, batch_size=16,
                            lr=1e-3, seed=0, patience=3)
    assert result.epochs_run == 6 and result.best_epoch == 5 and not result.converged
    assert result.val_history[-1] < 0.99 * result.val_history[0]          # it was learning, slowly
    with pytest.raises(ValueError, match="patience"):
        fit_regression(model, lambda m, idx: m(x[idx]), y, train, val, test, epochs=2, batch_size=16, lr=1e-3,
                       seed=0, patience=0)


class _Stop(Exception):
    pass


def test_a_fit_stopped_mid_way_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    """Killed after its third epoch, a fit restarted with the same checkpoint file ends exactly where an
    uninterrupted fit ends: curves, best epoch, test error and weights (cosine schedule, patience, shuffling)."""
    x, y, train, val, test = _linear_task()
    predict = lambda m, idx: m(x[idx])  # noqa: E731
    settings = dict(epochs=8, batch_size=16, lr=3e-2, seed=0, schedule="cosine", patience=5)

    def fresh(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    whole_model = fresh(0)
    whole = fit_regression(whole_model, predict, y, train, val, test, **settings)

    path = tmp_path / "cell.pt"

    def stop_after_third(epoch, value):
        if epoch == 2:
            raise _Stop
    with pytest.raises(_Stop):
        fit_regression(fresh(0), predict, y, train, val, test, on_epoch=stop_after_third, checkpoint=path, **settings)
    assert path.exists()
    resumed_model = fresh(1)                    # another initialisation: everything comes from the checkpoint
    seen = []
    resumed = fit_regression(resumed_model, predict, y, train, val, test, checkpoint=path,
                             on_epoch=lambda epoch, value: seen.append(epoch), **settings)
    assert seen[0] == 3                         # it went on after the third epoch
    assert resumed.val_history == whole.val_history and resumed.train_history == whole.train_history
    assert (resumed.best_epoch, resumed.test, resumed.converged) == (whole.best_epoch, whole.test, whole.converged)
    for a, b in zip(resumed_model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)
    assert not path.exists()                    # removed once the fit ended


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    x, y, train, val, test = _linear_task()
    path = tmp_path / "cell.pt"

    def stop(epoch, value):
        raise _Stop
    with pytest.raises(_Stop):
        fit_regression(torch.nn.Linear(4, 1), lambda m, idx: m(x[idx]), y, train, val, test, epochs=4, batch_size=16,
                       lr=1e-2, seed=0, on_epoch=stop, checkpoint=path)
    with pytest.raises(ValueError, match="other settings \\(differing: lr\\)"):
        fit_regression(torch.nn.Linear(4, 1), lambda m, idx: m(x[idx]), y, train, val, test, epochs=4, batch_size=16,
                       lr=2e-2, seed=0, checkpoint=path)


def test_has_converged_reads_a_plateau_as_converged_and_a_descent_as_not():
    from gradmetanet.metanets.training import has_converged

    descent = [1.0 / (1 + e) for e in range(20)]                   # still falling fast at the end
    assert not has_converged(descent, window=5)
    stopped = descent[:10] + [descent[9] * 1.01] * 10             # best epoch 9, ten epochs before the end
    assert has_converged(stopped, window=5)
    plateau = [1.0 - 0.5 * (1 - 0.5 ** e) for e in range(30)]      # creeping down by < 1% over the last epochs
    assert plateau[-1] < plateau[-2] and has_converged(plateau, window=5)
    assert not has_converged(plateau[:3], window=5)                # too short to tell
