"""The INR-editing experiment: its editors are equivariant end to end (an INR moved by a symmetry is edited
into the moved edit, so the rendered edit is the same image), they learn, and the run writes its report."""

from __future__ import annotations

import json

import pytest
import torch
from torch.func import vmap

from gradmetanet.zoos.inr import render
from gradmetanet.experiments import inr_edit


@pytest.fixture(scope="module")
def data():
    config = inr_edit.config_from_preset("tiny", n_images=12)
    return config, inr_edit.prepare(config, progress=False)


@pytest.mark.parametrize("backbone", inr_edit.BACKBONES)
@pytest.mark.parametrize("variant", inr_edit.VARIANTS)
def test_editors_render_the_same_edit_for_a_transformed_inr(data, backbone, variant):
    """Move each INR by a random element (permutations; sign flips too where the whole editor respects them:
    ScaleGMN without the permutation-only GradMetaNets), recompute its probe and gradient features, edit: the
    rendered image is unchanged. Sign flips do change the permutation-only editors' output."""
    config, d = data
    torch.manual_seed(0)
    model = inr_edit.inr_editor(d.spec, backbone, variant, config, d.rms).double()
    with torch.no_grad():
        for p in model.parameters():                 # not the near-identity start: a real edit
            p.add_(0.3 * torch.randn_like(p))
    idx = torch.arange(4)
    params = {k: v[idx].double() for k, v in d.zoo.params.items()}
    gen = torch.Generator().manual_seed(1)
    probe_coords = torch.rand(config.probe_points, 2, generator=gen, dtype=torch.float64) * 2 - 1
    grad_coords = torch.rand(config.grad_points, 2, generator=gen, dtype=torch.float64) * 2 - 1

    def edit(p):
        probes = inr_edit.preactivations(p, probe_coords, d.spec)
        grads = inr_edit.inr_gradient_sets(p, grad_coords, d.spec)
        return vmap(render)(inr_edit.edit(model, variant, p, probes, grads))

    sign_aware = backbone == "scalegmn" and variant in ("ws", "probing")
    element = d.spec.sample(torch.Generator().manual_seed(2))
    element = element if sign_aware else d.spec.permutation_part(element)
    moved = d.spec.transform_parameters(params, element, leading=1)
    torch.testing.assert_close(vmap(render)(moved), vmap(render)(params), atol=1e-9, rtol=0)   # a true symmetry
    torch.testing.assert_close(edit(moved), edit(params), atol=1e-8, rtol=0)
    if not sign_aware:
        flips = d.spec.sample(torch.Generator().manual_seed(3))
        assert (edit(d.spec.transform_parameters(params, flips, leading=1)) - edit(params)).abs().max() > 1e-6


def test_inr_edit_tiny_run_writes_its_report(tmp_path, monkeypatch):
    config = inr_edit.config_from_preset("tiny", backbones=("gmn", "scalegmn"), variants=("ws", "gradmetanet"))
    results = inr_edit.run(config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["models"]) == {"gmn", "scalegmn"}
    assert set(saved["models"]["gmn"]) == {"ws", "gradmetanet"}
    assert {"mean", "std"} <= set(saved["models"]["gmn"]["ws"])
    assert (tmp_path / "edits.png").stat().st_size > 0 and "dilation" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "learning_curves.png").stat().st_size > 0 and "Converged (" in (tmp_path / "table.md").read_text()
    assert saved["models"]["gmn"]["ws"]["converged"] == [False]          # one epoch: a fit cannot have converged
    assert results["unedited_mse"] > 0
    # a rerun into the same directory resumes: every cell is read back, nothing is trained again
    monkeypatch.setattr(inr_edit, "fit_regression", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-trained")))
    assert inr_edit.run(config, tmp_path, progress=False)["models"] == results["models"]
    # a run of one of those backbones (or a sub-list of variants) reads its cells back too: a cell's key names them
    fewer = inr_edit.run(inr_edit.config_from_preset("tiny", backbones=("gmn",), variants=("ws",)), tmp_path,
                         progress=False)
    assert fewer["models"]["gmn"]["ws"] == results["models"]["gmn"]["ws"]


def test_an_editor_learns_the_dilation(tmp_path):
    """GMN alone on 48 INRs, 12 epochs: the edited INRs are closer to the dilated images than the unedited ones
    by at least 25%."""
    config = inr_edit.config_from_preset("tiny", n_images=48, fit_steps=200, epochs=12, hidden=16, layers=2,
                                         backbones=("gmn",), variants=("ws",), batch_size=8, lr=3e-3)
    results = inr_edit.run(config, tmp_path, progress=False)
    mse = results["models"]["gmn"]["ws"]["mean"]
    assert mse < 0.75 * results["unedited_mse"], (mse, results["unedited_mse"])
