"""Run folders, cells and caches: nothing lost, nothing silently wrong (the curvature experiment at ``tiny``)."""

from __future__ import annotations

import json
from dataclasses import replace
import stat

import pytest

from gradmetanet.cli import main as cli_main
from gradmetanet.experiments import best_on_grid, curvature, on_grid_edge, store
from gradmetanet.experiments.store import CellStore, RunFolder, RunFolderError


@pytest.fixture
def tiny(tmp_path):
    return curvature.config_from_preset("tiny", models=("mlp_concat",), cache_dir=str(tmp_path / "cache"))


def test_a_folder_of_another_experiment_is_refused_and_left_alone(tmp_path, tiny):
    out = tmp_path / "run"
    RunFolder(out, "inr-edit", {"epochs": 3})
    (out / "results.json").write_text('{"experiment": "inr-edit"}')
    with pytest.raises(RunFolderError, match=r"holds the results of 'inr-edit', not of 'curvature'.*--overwrite"):
        curvature.run(tiny, out, progress=False)
    assert (out / "results.json").read_text() == '{"experiment": "inr-edit"}'
    curvature.run(tiny, out, progress=False, overwrite=True)
    assert json.loads((out / "results.json").read_text())["experiment"] == "curvature"


def test_a_folder_written_before_run_json_existed_is_refused(tmp_path, tiny):
    out = tmp_path / "old"
    out.mkdir()
    (out / "table.md").write_text("| an older table |")
    with pytest.raises(RunFolderError, match="--overwrite"):
        curvature.run(tiny, out, progress=False)


def test_other_settings_are_refused_and_overwrite_keeps_every_finished_cell(tmp_path, tiny):
    out = tmp_path / "run"
    first = curvature.run(tiny, out, progress=False)
    changed = curvature.config_from_preset("tiny", models=("mlp_concat",), cache_dir=tiny.cache_dir, lr=3e-3)
    with pytest.raises(RunFolderError, match=r"other settings \(changed: lr\)"):
        curvature.run(changed, out, progress=False)
    second = curvature.run(changed, out, progress=False, overwrite=True)
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert sorted(c["depends"]["lr"] for c in cells) == [1e-3, 3e-3]          # both kept, beside each other
    curvature.run(tiny, out, progress=False, overwrite=True)                 # back: the first cell is reused
    assert json.loads((out / "results.json").read_text())["models"]["mlp_concat"] == \
        json.loads(json.dumps(first["models"]["mlp_concat"]))
    assert second["models"]["mlp_concat"] != first["models"]["mlp_concat"]


def test_cells_of_another_code_version_are_recomputed_not_reused(tmp_path, monkeypatch):
    cells = CellStore(tmp_path / "cells.json", "curvature")
    cells.put("a", {"lr": 1}, {"test": 0.5})
    assert cells.get("a", {"lr": 1}) == {"test": 0.5} and cells.get("a", {"lr": 2}) is None
    monkeypatch.setattr(store, "package_version", lambda: "99.0")
    newer = CellStore(tmp_path / "cells.json", "curvature")
    assert newer.get("a", {"lr": 1}) is None
    newer.put("a", {"lr": 1}, {"test": 0.4})
    assert len(json.loads((tmp_path / "cells.json").read_text())["cells"]) == 2


def test_a_cell_recorded_with_settings_since_declared_irrelevant_is_reused(tmp_path):
    """An entry that recorded more settings (the run's list of models, its seed count) matches a request that no
    longer names them; a setting the request names that the entry lacks, or records otherwise, does not match."""
    cells = CellStore(tmp_path / "cells.json", "inr-edit")
    cells.put("dws/ws/0", {"lr": 1, "seeds": 1, "backbones": ["dws"]}, {"test": 0.5})
    assert cells.get("dws/ws/0", {"lr": 1}) == {"test": 0.5}
    assert cells.get("dws/ws/0", {"lr": 2}) is None
    assert cells.get("dws/ws/0", {"lr": 1, "width": 3}) is None
    assert cells.get("dws/ws/0", {"lr": 1, "seeds": 3}) is None


def test_a_cells_file_of_an_earlier_layout_is_kept_aside(tmp_path):
    (tmp_path / "cells.json").write_text('{"config_key": "abc", "cells": {"x": {"test": 1}}}')
    CellStore(tmp_path / "cells.json", "curvature").put("y", {}, {"test": 2})
    assert json.loads((tmp_path / "cells.v1.json").read_text())["cells"] == {"x": {"test": 1}}


def test_results_carry_provenance_and_are_readable_by_colleagues(tmp_path, tiny):
    out = tmp_path / "run"
    curvature.run(tiny, out, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert {"package_version", "commit", "torch", "device", "threads", "load_average_1min"} <= set(results["provenance"])
    for name in ("results.json", "table.md", "cells.json", "run.json", "curvature.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) & 0o044 == 0o044, name        # group and others read


def test_an_output_folder_that_cannot_be_written_fails_before_any_compute(tmp_path, tiny, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(curvature, "load_or_generate_siren_zoo", lambda *a, **k: pytest.fail("computed first"))
    with pytest.raises(RunFolderError, match="cannot create the output folder"):
        curvature.run(tiny, tmp_path / "a-file" / "run", progress=False)


def test_a_non_finite_baseline_stops_the_run_with_its_cause(tmp_path, tiny, monkeypatch):
    zoo = curvature.load_or_generate_siren_zoo(tiny.zoo(), tiny.cache_dir, progress=False)
    zoo.standard[0, 0] = float("inf")
    monkeypatch.setattr(curvature, "load_or_generate_siren_zoo", lambda *a, **k: zoo)
    with pytest.raises(FloatingPointError, match="standard estimator on the test networks is inf"):
        curvature.run(tiny, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("setting, message", [
    ("epochs=abc", "setting epochs='abc': expected int"), ("epochs=2.5", "setting epochs=2.5: expected int"),
    ("lr=fast", "setting lr='fast': expected float"), ("seeds=0", "seeds=0: counts and sizes must be at least 1"),
    ("n_test=0", "n_test=0: counts and sizes must be at least 1"), ("epochs=0", "at least 1"),
    ("lr=-1e-3", "lr=-0.001: must be positive"), ("train_sizes=[8,'x']", "expected a list of int"),
    ("no_such_field=3", r"unknown setting\(s\) \['no_such_field'\]"),
    ("models=['gradmetanet','resnet']", "unknown curvature models"),
])
def test_bad_settings_fail_in_one_line_before_any_compute(setting, message, monkeypatch, tmp_path):
    monkeypatch.setattr(curvature, "load_or_generate_siren_zoo", lambda *a, **k: pytest.fail("computed first"))
    with pytest.raises(SystemExit, match=f"^gradmetanet: .*{message}"):
        cli_main(["run", "curvature", "--preset", "tiny", "--out", str(tmp_path / "run"), "--set", setting])


def test_cli_help_lists_every_experiment_with_its_presets_and_settings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    text = capsys.readouterr().out
    for name in ("curvature", "fisher-trace", "lopt", "lora", "inr-edit", "amortize"):
        assert f"  {name}: " in text
    assert "presets: paper, cpu, quick, tiny" in text and "sgd_lrs" in text and "--overwrite" in text
    with pytest.raises(SystemExit, match="unknown preset"):
        cli_main(["run", "curvature", "--preset", "huge"])


def test_cli_refuses_another_experiments_folder_in_one_line(tmp_path):
    RunFolder(tmp_path / "run", "lopt", {})
    with pytest.raises(SystemExit, match=r"^gradmetanet: .*holds the results of 'lopt'"):
        cli_main(["run", "curvature", "--preset", "tiny", "--out", str(tmp_path / "run")])


def test_tuning_grids_pick_the_lowest_finite_score_and_flag_their_edges():
    """The one lr-grid rule of the learned-optimizer race (Adam's rate) and of zoo fine-tuning (SGD's rates): a
    diverged run (NaN or inf) never wins, and a choice at either end of the grid is flagged."""
    assert best_on_grid({0.01: 0.5, 0.1: float("nan"), 1.0: float("inf"), 0.03: 0.4}) == 0.03
    assert best_on_grid({0.1: float("nan"), 0.3: 2.0}) == 0.3
    assert on_grid_edge(0.01, (0.1, 0.01, 0.03)) and on_grid_edge(0.1, (0.1, 0.01, 0.03))
    assert not on_grid_edge(0.03, (0.1, 0.01, 0.03)) and on_grid_edge(0.1, (0.1,))


def test_a_cell_does_not_depend_on_the_other_training_sizes(tmp_path):
    """A curvature cell is keyed by its training size: a rerun with fewer sizes reads it back, not retrains it."""
    config = curvature.config_from_preset("tiny", models=("mlp_concat",), train_sizes=(8, 12),
                                          cache_dir=str(tmp_path / "cache"))
    both = curvature.run(config, tmp_path / "run", progress=False)
    alone = curvature.run(replace(config, train_sizes=(12,)), tmp_path / "run", progress=False, overwrite=True)
    assert alone["models"]["mlp_concat"]["12"] == both["models"]["mlp_concat"]["12"]


CLAIM_PRESETS = {"curvature": ("cpu", "paper"), "fisher_trace": ("paper",), "inr_edit": ("cpu", "paper"),
                 "generalisation": ("cpu", "paper"), "ws_bench": ("cpu", "paper"), "lora": ("cpu", "lm-cpu", "paper")}


@pytest.mark.parametrize("module, preset", [(m, p) for m, presets in CLAIM_PRESETS.items() for p in presets])
def test_claim_presets_stop_on_validation_with_room_to_converge(module, preset):
    """The presets that make a claim train until validation stops improving (patience), under an epoch cap that
    leaves room for it: a fixed short count reports models stopped before they converged (issue 24)."""
    import importlib
    config = importlib.import_module(f"gradmetanet.experiments.{module}").PRESETS[preset]
    assert config.patience is not None, f"{module} preset {preset!r} trains a fixed number of epochs"
    assert config.epochs >= 6 * config.patience, f"{module} preset {preset!r}: {config.epochs} epochs for patience {config.patience}"
