"""The curvature experiment end to end on a tiny configuration, and the SIREN zoo behind it."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gradmetanet import GradientCapture
from gradmetanet.models import siren_module, siren_spec
from gradmetanet.zoos.siren import SirenZooConfig, generate_siren_zoo, load_or_generate_siren_zoo
from gradmetanet.experiments import curvature
from gradmetanet.experiments import curvature_reference as reference


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curvature")
    config = curvature.config_from_preset("tiny", cache_dir=str(out / "cache"))
    return config, out, curvature.run(config, out / "run", progress=False)


def test_files_and_json_schema(tiny_run):
    config, out, results = tiny_run
    run_dir = out / "run"
    for name in ("results.json", "table.md", "curvature.png", "cells.json"):
        assert (run_dir / name).stat().st_size > 0
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["metric"] == curvature.METRIC
    assert set(saved["models"]) == {"standard", *curvature.MODEL_KEYS, *curvature.REFERENCE_KEYS}
    for per_size in saved["models"].values():
        assert set(per_size) == {str(n) for n in config.train_sizes}
        for cell in per_size.values():
            assert isinstance(cell["mean"], float) and isinstance(cell["std"], float) and cell["mean"] > 0
            assert list(cell["per_layer"]) == list(siren_spec(config.zoo().widths).param_shapes())
            assert sum(cell["per_layer"].values()) == pytest.approx(1.0)
    assert sum(saved["target_variance_share"].values()) == pytest.approx(1.0)
    table = (run_dir / "table.md").read_text()
    assert "GradMetaNet++" in table and "Standard estimator" in table and "Reference: quadrature" in table
    assert "Where the error lies" in table
    assert (run_dir / "curvature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every learned model's learning curve (the largest size, seed 0), and whether each fit converged
    assert (run_dir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(saved["learning_curves"]) == set(curvature.MODEL_KEYS)
    assert all(len(c["val"]) == config.epochs for c in saved["learning_curves"].values())
    assert "Converged (" in table and re.search(rf"GradMetaNet \d/{len(config.train_sizes) * config.seeds}\b", table)


def test_standard_estimator_matches_an_independent_computation(tiny_run):
    """Rebuild each test SIREN as an nn.Module, capture its gradients, and recompute the error."""
    config, out, results = tiny_run
    zoo = load_or_generate_siren_zoo(config.zoo(), config.cache_dir, progress=False)
    estimates, targets = [], []
    for k in range(config.n_test):
        params = {name: value[k].double() for name, value in zoo.params.items()}
        model = siren_module(params, zoo.config.widths, zoo.config.omega_0)
        fishers = []
        for points in (zoo.points[k], zoo.target_inputs[k]):
            model.zero_grad()
            with GradientCapture(model, loss_reduction="sum") as cap:
                model(points.double()[:, None]).sum().backward()
            fishers.append(torch.cat([v.flatten() for v in cap.gradients.empirical_fisher_diag().values()]))
        estimates.append(fishers[0])
        targets.append(fishers[1])
    estimates, targets = torch.stack(estimates), torch.stack(targets)
    expected = ((estimates - targets).square().mean() / targets.var()).item()
    assert results["models"]["standard"]["8"]["mean"] == pytest.approx(expected, rel=1e-4)


def test_rerun_resumes_without_refitting(tiny_run, monkeypatch):
    config, out, results = tiny_run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(curvature, "fit_regression", refuse)
    again = curvature.run(config, out / "run", progress=False)
    assert again["models"] == results["models"]


def test_zoo_cache_is_reused_and_rebuilt_when_damaged(tmp_path, capsys):
    """The issue's case: data bytes overwritten with the header intact are caught by the checksum, named, rebuilt."""
    config = SirenZooConfig(n_networks=4, set_size=4, target_points=8)
    first = load_or_generate_siren_zoo(config, tmp_path, progress=False)
    (path,) = tmp_path.glob("siren_zoo_*/zoo.safetensors")
    again = load_or_generate_siren_zoo(config, tmp_path, progress=False)
    assert torch.equal(first.target, again.target) and capsys.readouterr().err == ""
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64                        # NaNs in the last tensor; the header still parses
    path.write_bytes(bytes(data))
    regenerated = load_or_generate_siren_zoo(config, tmp_path, progress=False)
    assert "does not match its SHA-256" in capsys.readouterr().err
    assert torch.equal(first.target, regenerated.target)
    path.write_bytes(b"corrupted")
    assert torch.equal(first.target, load_or_generate_siren_zoo(config, tmp_path, progress=False).target)
    assert "bytes, the manifest says" in capsys.readouterr().err
    other = load_or_generate_siren_zoo(SirenZooConfig(n_networks=4, set_size=4, target_points=8, seed=1), tmp_path,
                                       progress=False)
    assert not torch.equal(first.target, other.target) and len(list(tmp_path.glob("*/zoo.safetensors"))) == 2


def test_zoo_features_match_gradient_capture():
    zoo = generate_siren_zoo(SirenZooConfig(n_networks=3, set_size=5, target_points=7), progress=False)
    for k in range(3):
        model = siren_module({n: v[k].double() for n, v in zoo.params.items()}, zoo.config.widths, 1.0)
        with GradientCapture(model, loss_reduction="sum") as cap:
            model(zoo.points[k].double()[:, None]).sum().backward()
        feats = torch.cat(list(cap.gradients.neuron_features().values()), 1)
        torch.testing.assert_close(feats.float(), zoo.features[k], atol=1e-4, rtol=1e-4)
    assert torch.all((zoo.points >= -1) & (zoo.points <= 1))


def test_fisher_trace_targets_and_tiny_run(tmp_path):
    """log tr(F) from factors equals the dense computation; the tiny run writes its table."""
    from gradmetanet.models.mlp import make_mlp
    from gradmetanet.experiments import fisher_trace
    from torch.func import functional_call, jacrev, vmap

    torch.manual_seed(0)
    model = make_mlp([3, 9, 9, 1], "tanh").double()
    x = torch.randn(11, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],)).sum()), in_dims=(None, 0))(params, x)
    dense = sum(j.flatten(1).square().sum(1) for j in jac.values()).mean().log().item()
    assert fisher_trace._log_trace(model, x) == pytest.approx(dense, rel=1e-10)
    results = fisher_trace.run(fisher_trace.config_from_preset("tiny"), tmp_path, progress=False)
    assert set(results["models"]) == {"gradmetanet", "mlp"}
    assert all(r["normalised_mae"] > 0 for r in results["models"].values())
    assert "normalised MAE" in (tmp_path / "table.md").read_text()
    assert "Converged (" in (tmp_path / "table.md").read_text() and (tmp_path / "learning_curves.png").exists()



def test_reference_estimators():
    """Quadrature weights sum to one, follow the points, and integrate a smooth function far better than
    the sample mean; the product of means is exact where ``a`` is constant and differs elsewhere;
    per-layer shares sum to one and point at the layer that holds the error."""
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(200, 64, generator=gen, dtype=torch.float64) * 2 - 1
    weights = reference.quadrature_weights(points)
    torch.testing.assert_close(weights.sum(1), torch.ones(200, dtype=torch.float64))
    perm = torch.randperm(64, generator=gen)
    torch.testing.assert_close(reference.quadrature_weights(points[:, perm]), weights[:, perm])
    fraction = (points < 0).double().mean(1)
    exact = fraction * (1 / 3) + (1 - fraction) * (1 / 3)          # E x^2 within each half of [-1, 1]
    quadrature_error = ((weights * points.square()).sum(1) - exact).abs().mean()
    sample_error = (points.square().mean(1) - exact).abs().mean()
    assert quadrature_error < 0.1 * sample_error

    spec = siren_spec((1, 4, 3, 1))
    features = torch.randn(5, 16, spec.n_neurons, 2, generator=gen, dtype=torch.float64)
    standard = reference.squared_point_gradients(spec, features).mean(1)
    pom = reference.product_of_means(spec, features)
    assert not torch.allclose(pom, standard)
    constant = features.clone()
    constant[..., 0] = features[:, :1, :, 0]                        # every point has the same activations
    torch.testing.assert_close(reference.product_of_means(spec, constant),
                               reference.squared_point_gradients(spec, constant).mean(1))

    target = standard.clone()
    wrong = standard.clone()
    wrong[:, :4] += 1.0                                             # "0.weight" holds every error
    shares = reference.per_layer_shares(spec, wrong, target)
    assert shares["0.weight"] == pytest.approx(1.0) and sum(shares.values()) == pytest.approx(1.0)


def test_table_says_when_no_learned_model_beats_the_standard(tiny_run):
    config, out, results = tiny_run
    largest = str(config.train_sizes[-1])
    losing = json.loads(json.dumps(results))
    for key in curvature.MODEL_KEYS:
        losing["relative_improvement_over_standard"][key][largest] = -0.5
    assert "No learned model beats the standard estimator" in curvature.render_table(losing)
    winning = json.loads(json.dumps(losing))
    winning["relative_improvement_over_standard"]["gradmetanet_set"][largest] = 0.2
    assert "No learned model beats" not in curvature.render_table(winning)


def test_a_run_stopped_mid_cell_resumes_mid_cell(tmp_path, monkeypatch):
    """The first fit is killed after its first epoch; the rerun continues that fit from its checkpoint (its first
    epoch is the second) and removes the checkpoint once the cell is stored."""
    config = curvature.config_from_preset("tiny", cache_dir=str(tmp_path / "cache"), epochs=3,
                                          models=("gradmetanet",), train_sizes=(8,))
    real = curvature.fit_regression
    epochs_seen = []

    class Killed(Exception):
        pass

    def killed_after_first_epoch(*args, on_epoch=None, **kwargs):
        def hook(epoch, value):
            raise Killed
        return real(*args, on_epoch=hook, **kwargs)

    def recording(*args, on_epoch=None, **kwargs):
        return real(*args, on_epoch=lambda epoch, value: epochs_seen.append(epoch), **kwargs)

    monkeypatch.setattr(curvature, "fit_regression", killed_after_first_epoch)
    with pytest.raises(Killed):
        curvature.run(config, tmp_path / "run", progress=False)
    assert len(list((tmp_path / "run" / "checkpoints").glob("*.pt"))) == 1
    monkeypatch.setattr(curvature, "fit_regression", recording)
    results = curvature.run(config, tmp_path / "run", progress=False)
    assert epochs_seen == [1, 2]
    assert list((tmp_path / "run" / "checkpoints").glob("*.pt")) == []
    assert len(results["learning_curves"]["gradmetanet"]["val"]) == 3


def test_zoo_list_and_verify_commands_name_a_damaged_zoo(tmp_path, capsys):
    """`gradmetanet zoo list` shows every cached zoo with its status; `zoo verify` exits 1 naming the damage."""
    from gradmetanet.cli import main

    load_or_generate_siren_zoo(SirenZooConfig(n_networks=4, set_size=4, target_points=8), tmp_path, progress=False)
    (folder,) = tmp_path.glob("siren_zoo_*")
    assert main(["zoo", "list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "1 zoo(s)" in listing and f"| {folder.name} | siren_zoo |" in listing and "networks 4 | ok |" in listing
    assert main(["zoo", "verify", str(folder)]) == 0 and capsys.readouterr().out.strip().endswith(": ok")
    path = folder / "zoo.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    path.write_bytes(bytes(data))
    assert main(["zoo", "verify", str(folder)]) == 1
    assert "does not match its SHA-256" in capsys.readouterr().out
    main(["zoo", "list", "--cache-dir", str(tmp_path)])
    assert "does not match its SHA-256" in capsys.readouterr().out
