"""One-shot fine-tuning of zoos: the zoo is trained as its networks would be one by one, the one-pass fine-tuner is
equivariant end to end on real CNNs (a moved network is fine-tuned into the moved result, with the same loss)
and learns, SGD's vectorised baseline is torch.optim.SGD, the Small CNN Zoo files load, the run reports."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gradmetanet import NetworkSpec
from gradmetanet.metanets import OnePassFineTuner
from gradmetanet.zoos import evaluate_networks, l1_norms, objective, sgd_finetune
from gradmetanet.zoos.classifier import (ClassifierZooConfig, batched_logits, generate_classifier_zoo,
                                             load_or_generate_classifier_zoo, load_small_cnn_zoo,
                                             small_cnn_zoo_template)
from gradmetanet.experiments import amortize
from gradmetanet.testing import check_symmetry
from gradmetanet import spec_of
from small_cnn_files import write_small_cnn_zoo


def cnn_zoo(activation: str, n: int = 3) -> tuple[torch.nn.Module, NetworkSpec, dict[str, torch.Tensor]]:
    template = small_cnn_zoo_template(activation).double()
    spec = spec_of(template, torch.randn(2, 1, 28, 28, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    params = {k: v.detach() + 0.1 * torch.randn(n, *v.shape, generator=gen, dtype=torch.float64)
              for k, v in template.named_parameters()}
    return template, spec, params


def move(x, g, spec):
    return spec.transform_parameters(x, g, leading=1)


def test_batched_logits_are_each_networks_own():
    template, _, params = cnn_zoo("tanh")
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    got = batched_logits(template, params, x)
    for i in range(3):
        want = functional_call(template, {k: v[i] for k, v in params.items()}, (x,))
        torch.testing.assert_close(got[i], want, atol=1e-12, rtol=0)
    own = torch.randn(3, 5, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(batched_logits(template, params, own, shared=False)[1],
                               functional_call(template, {k: v[1] for k, v in params.items()}, (own[1],)))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_one_pass_fine_tuner_moves_with_the_network_and_keeps_its_loss(activation):
    """ScaleGMN-B on Small-CNN-Zoo networks: channel permutations and sign flips (tanh) or positive scales (ReLU)
    of the input network give the moved fine-tuned network, which computes the same function, so the objective
    of the result is unchanged; the symmetry-broken GMN-B follows permutations only."""
    template, spec, params = cnn_zoo(activation)
    rms = {k: v.square().mean().sqrt() for k, v in params.items()}
    torch.manual_seed(0)
    model = OnePassFineTuner(spec, rms, "scalegmn", hidden=8, layers=2, out_scale=1.0).double()
    check_symmetry(spec, model, params, move, move, group="full", atol=1e-8, sensitivity=("fixed",))
    x, y = torch.randn(16, 1, 28, 28, dtype=torch.float64), torch.randint(10, (16,))
    g = spec.sample(torch.Generator().manual_seed(4))
    moved = model(move(params, g, spec))
    torch.testing.assert_close(objective(template, moved, x, y, 0), objective(template, model(params), x, y, 0))
    # the L1 term keeps sign flips and permutations but not positive scales: with lambda > 0 the ReLU objective
    # itself prefers one scaling of each network (see docs/choices.md)
    l1_change = (l1_norms(moved) - l1_norms(model(params))).abs().max().item()
    assert (l1_change > 1e-3) if activation == "relu" else (l1_change < 1e-9)
    broken = OnePassFineTuner(spec, rms, "gmn_broken", hidden=8, layers=2, out_scale=1.0).double()
    check_symmetry(spec, broken, params, move, move, group="perm", atol=1e-8)
    got, want = broken(move(params, g, spec)), move(broken(params), g, spec)
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 1e-4


def test_sgd_baseline_is_torch_optim_sgd_per_network():
    """Three networks fine-tuned together equal each fine-tuned alone by torch.optim.SGD(momentum=0.9) on the same
    batches and objective (cross-entropy + L1)."""
    template, _, params = cnn_zoo("tanh")
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 1, 28, 28, dtype=torch.float64, generator=gen), torch.randint(10, (20,), generator=gen)
    runs = sgd_finetune(template, params, x, y, l1=1e-3, lr=0.05, epochs=(1, 2), batch_size=8, seed=3)
    assert set(runs) == {1, 2}
    order = torch.Generator().manual_seed(3)
    batches = [torch.randperm(20, generator=order) for _ in range(2)]
    for i in range(3):
        net = small_cnn_zoo_template("tanh").double()
        net.load_state_dict({k: v[i] for k, v in params.items()})
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for perm in batches:
            for idx in perm.split(8):
                opt.zero_grad()
                loss = F.cross_entropy(net(x[idx]), y[idx]) + 1e-3 * sum(p.abs().sum() for p in net.parameters())
                loss.backward()
                opt.step()
        for k, v in net.named_parameters():
            torch.testing.assert_close(runs[2][0][k][i], v.detach(), atol=1e-10, rtol=0)


def test_metrics_of_a_table_cell():
    template, _, params = cnn_zoo("tanh")
    x, y = torch.randn(30, 1, 28, 28, dtype=torch.float64), torch.randint(10, (30,))
    half = {k: v / 2 for k, v in params.items()}
    m = evaluate_networks(template, half, params, x, y, 0.01, 0.5)
    acc = (batched_logits(template, half, x).argmax(-1) == y).double().mean(1)
    assert m.mean_acc == pytest.approx(acc.mean().item()) and m.max_acc == pytest.approx(acc.max().item())
    assert m.sparsity == pytest.approx(50.0)
    assert m.test_loss == pytest.approx(objective(template, half, x, y, 0.01).mean().item())
    assert l1_norms(half).shape == (3,)


def test_the_zoo_is_varied_cached_and_split(tmp_path):
    config = ClassifierZooConfig(architecture="mlp", networks=40, steps=(2, 60), lr=(1e-3, 0.3))
    zoo = load_or_generate_classifier_zoo(config, tmp_path, progress=False)
    assert zoo.accuracy.max() - zoo.accuracy.min() > 0.3             # weak and strong networks
    again = load_or_generate_classifier_zoo(config, tmp_path, progress=False)
    for k in zoo.params:
        assert torch.equal(zoo.params[k], again.params[k])
    assert list(again.params) == list(zoo.params) == [n for n, _ in zoo.template().named_parameters()]
    manifest = json.loads(next(tmp_path.glob("classifier_zoo_*/manifest.json")).read_text())["summary"]
    assert manifest["networks"] == 40 and manifest["parameters"] == 64 * 32 + 32 + 32 * 32 + 32 + 330
    for split in (zoo.images, zoo.networks):
        together = torch.cat(list(split.values()))
        assert len(together.unique()) == len(together)                 # disjoint
    x, y = zoo.data()
    net = zoo.template()
    net.load_state_dict({k: v[5] for k, v in zoo.params.items()})
    test = zoo.images["test"]
    assert (net(x[test]).argmax(1) == y[test]).float().mean().item() == pytest.approx(zoo.accuracy[5].item())


def test_unknown_zoos_and_cnns_on_sequences_are_refused():
    with pytest.raises(ValueError, match="architecture-activation"):
        amortize.config_from_preset("tiny", zoos=("cnn",))
    with pytest.raises(ValueError, match="unknown zoo"):
        amortize.config_from_preset("tiny", zoos=("cnn-sigmoid",))
    with pytest.raises(ValueError, match="MNIST-1D sequences go to the MLP zoo"):
        amortize.config_from_preset("tiny", zoos=("cnn-tanh-mnist1d",))
    with pytest.raises(ValueError, match="unknown models"):
        amortize.config_from_preset("tiny", models=("scalegmn", "nfn"))
    with pytest.raises(ValueError, match="recipes: \\['long', 'diverse'\\]"):
        amortize.config_from_preset("tiny", zoos=("mlp-tanh-mnist1d-short",))


def test_a_recipe_suffix_trains_the_zoo_longer_and_keeps_the_rest():
    config = amortize.config_from_preset("tiny")
    plain, long = amortize.zoo_config(config, "mlp-tanh-mnist1d"), amortize.zoo_config(config, "mlp-tanh-mnist1d-long")
    assert plain.steps == config.zoo_steps and long.steps == amortize.RECIPES["long"]["steps"]
    assert long.dataset == "mnist1d" and long.name == plain.name and long.key() != plain.key()
    assert amortize.zoo_config(config, "cnn-tanh-long").dataset == "digits"
    diverse = amortize.zoo_config(config, "mlp-tanh-mnist1d-diverse")
    assert (diverse.steps, diverse.lr, diverse.subset) == (amortize.RECIPES["diverse"]["steps"],
                                                          amortize.RECIPES["diverse"]["lr"],
                                                          amortize.RECIPES["diverse"]["subset"])
    assert diverse.architecture == "mlp" and diverse.key() not in (plain.key(), long.key())


def test_small_cnn_zoo_files_load_into_the_template(tmp_path):
    """A tiny copy of the public format, written here: TensorFlow order in, PyTorch order out, final steps and the
    chosen activation only."""
    template = small_cnn_zoo_template("tanh")
    names = list(template.state_dict())
    gen = torch.Generator().manual_seed(0)
    nets = [{k: torch.randn(v.shape, generator=gen) for k, v in template.state_dict().items()} for _ in range(4)]
    start = write_small_cnn_zoo(tmp_path, nets, ["86,tanh,0.4", "86,relu,0.5", "85,tanh,0.3", "86,tanh,0.45"])
    params, metrics = load_small_cnn_zoo(tmp_path, "tanh")
    assert torch.equal(metrics["test_accuracy"], torch.tensor([0.4, 0.45]))
    for k in names:
        torch.testing.assert_close(params[k][0], nets[0][k])
        torch.testing.assert_close(params[k][1], nets[3][k])
    assert start == 4970
    with pytest.raises(FileNotFoundError, match="metrics.csv.gz"):
        (tmp_path / "metrics.csv.gz").unlink()
        load_small_cnn_zoo(tmp_path)


def test_the_fine_tuner_learns_on_a_zoo():
    """A few epochs on a small MLP zoo lower the held-out objective of the validation networks by at least 10%
    (measured: 1.17 -> 0.95, by the one fit loop of version 0.9)."""
    config = amortize.config_from_preset("tiny", networks=60, zoo_steps=(20, 80), epochs=4, hidden=16, layers=2,
                                         net_batch=8, image_batch=64, lr=1e-2, out_scale=1.0)
    zoo = generate_classifier_zoo(amortize.zoo_config(config, "mlp-tanh"), progress=False)
    x, y = zoo.data()
    spec = spec_of(zoo.template(), x[:2])
    _, history = amortize.train_finetuner(zoo, spec, x, y, "scalegmn", 0.0, config, progress=False)
    assert min(history["val"]) < 0.9 * history["before_val"], history


def test_amortize_tiny_run_writes_the_table_and_resumes(tmp_path, monkeypatch):
    config = amortize.config_from_preset("tiny")
    results = amortize.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {k: v for k, v in saved.items() if k != "provenance"} == json.loads(json.dumps(results))
    entry = saved["mlp-tanh"]["lambda=0.001"]
    assert set(entry) == {"before", "scalegmn", "gmn_broken", "scalegmn_grad", "sgd"} and set(entry["sgd"]) == {"1", "2"}
    for cell in [entry["before"], entry["scalegmn"], entry["sgd"]["2"]]:
        assert {"mean_acc", "max_acc", "test_loss", "sparsity", "seconds_per_net"} <= set(cell)
    assert set(saved["mlp-tanh"]) == {"lambda=0", "lambda=0.001"}
    assert (tmp_path / "accuracies.png").stat().st_size > 1000 and (tmp_path / "learning_curves.png").stat().st_size > 1000
    table = (tmp_path / "table.md").read_text()
    assert "Converged (" in table
    assert "ScaleGMN-B (1 pass)" in table
    assert all(f"lr {cell['lr']:g}, grid edge)" in table for cell in entry["sgd"].values())   # a two-point grid
    monkeypatch.setattr(amortize, "train_finetuner", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    monkeypatch.setattr(amortize, "sgd_finetune", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    assert amortize.run(config, tmp_path, progress=False) == results


def test_amortize_recomputes_only_the_cells_whose_settings_changed(tmp_path, monkeypatch):
    """A wider SGD grid (run with overwrite=True: the folder holds other settings) reruns SGD and keeps the
    metanetworks."""
    config = dataclasses.replace(amortize.config_from_preset("tiny"), models=("gmn_broken",), lambdas=(0.0,))
    first = amortize.run(config, tmp_path, progress=False)
    calls = []
    real_sgd = amortize.sgd_finetune
    monkeypatch.setattr(amortize, "train_finetuner", lambda *a, **k: pytest.fail("a metanetwork was retrained"))
    monkeypatch.setattr(amortize, "sgd_finetune", lambda *a, **k: calls.append(a[5]) or real_sgd(*a, **k))
    wider = dataclasses.replace(config, sgd_lrs=(0.01, 0.1, 0.3))
    with pytest.raises(ValueError, match=r"other settings \(changed: sgd_lrs\)"):
        amortize.run(wider, tmp_path, progress=False)
    results = amortize.run(wider, tmp_path, progress=False, overwrite=True)
    assert 0.3 in calls                                   # the new rate was tried
    assert results["mlp-tanh"]["lambda=0"]["gmn_broken"] == json.loads(json.dumps(
        first["mlp-tanh"]["lambda=0"]["gmn_broken"]))
    monkeypatch.setattr(amortize, "train_finetuner", lambda *a, **k: pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception, match="stop"):   # a metanetwork setting retrains the metanetwork
        amortize.run(dataclasses.replace(wider, hidden=4), tmp_path, progress=False, overwrite=True)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_gradient_feature_moves_as_the_weights_so_scalegmn_grad_is_equivariant(activation):
    """``theta^2 dL/dtheta`` recomputed on the moved network is the moved feature (signs and positive scales), so
    ScaleGMN-B reading it fine-tunes a moved network into the moved result; the raw gradient does not move so."""
    from gradmetanet.metanets import gradient_features

    template, spec, params = cnn_zoo(activation)
    x, y = torch.randn(12, 1, 28, 28, dtype=torch.float64), torch.randint(10, (12,))
    feats = gradient_features(template, params, x, y)
    rms = {k: v.square().mean().sqrt() for k, v in params.items()}
    torch.manual_seed(0)
    model = OnePassFineTuner(spec, rms, "scalegmn_grad", hidden=8, layers=2,
                             gradient_rms={k: v.square().mean().sqrt() for k, v in feats.items()}).double()
    gen = torch.Generator().manual_seed(6)
    for _ in range(2):
        g = spec.sample(gen)
        moved = move(params, g, spec)
        moved_feats = gradient_features(template, moved, x, y)
        for k in feats:
            torch.testing.assert_close(moved_feats[k], move(feats, g, spec)[k], atol=1e-10, rtol=1e-8)
        got, want = model(moved, moved_feats), move(model(params, feats), g, spec)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-8, rtol=1e-8)
    if activation == "relu":                        # a raw gradient moves inversely under positive scales
        raw = {k: v / params[k].square() for k, v in feats.items()}
        moved_raw = {k: v / moved[k].square() for k, v in moved_feats.items()}
        assert max((moved_raw[k] - move(raw, g, spec)[k]).abs().max().item() for k in raw) > 1e-3
    with pytest.raises(ValueError, match="reads gradient features"):
        model(params)
