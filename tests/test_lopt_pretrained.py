"""Rule files (safetensors) and the optimizers shipped inside the package."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gradmetanet.models.mlp import make_mlp
from gradmetanet.lopt import available, load_rule, pretrained, save_rule
from gradmetanet.lopt.optimizers import make_rule


@pytest.mark.parametrize("name", ["ds", "unf", "gradmetanet_ds"])
def test_rule_files_round_trip(tmp_path, name):
    torch.manual_seed(0)
    rule = make_rule(name)
    with torch.no_grad():
        rule.beta.fill_(0.37)
    save_rule(rule, name, tmp_path / "r.safetensors", {"command": "test"})
    loaded = load_rule(tmp_path / "r.safetensors")
    assert type(loaded.per_parameter) is type(rule.per_parameter)
    for (k, a), (k2, b) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("name, arguments", [
    ("ds", {"hidden": 48, "layers": 2}),
    ("gradmetanet_ds", {"hidden": 24, "gradmetanet_hidden": 8, "gradmetanet_features": 6, "set_size": None}),
    ("gradmetanet_unf", {"hidden": 16, "set_size": 8, "signatures": "transformer"}),
])
def test_rule_files_describe_themselves(tmp_path, name, arguments):
    """A rule of non-default sizes loads from its file alone (0.8 rebuilt the default sizes and failed, or read a
    rule of whole batches as one of 32 examples): same meta-parameters, same set size, same signatures."""
    torch.manual_seed(0)
    rule = make_rule(name, **arguments)
    save_rule(rule, name, tmp_path / "r.safetensors")
    loaded = load_rule(tmp_path / "r.safetensors")
    assert loaded.recipe == rule.recipe and loaded.set_size == rule.set_size
    assert list(loaded.state_dict()) == list(rule.state_dict())
    for key, value in rule.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if rule.equivariant is not None:
        assert loaded.equivariant.signatures == rule.equivariant.signatures


def test_rule_files_refuse_rules_they_could_not_rebuild(tmp_path):
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.metanets.layers import MLP
    from gradmetanet.metanets import LINEAR_SIGNATURES

    with pytest.raises(ValueError, match="composed by hand"):
        save_rule(UpdateRule(MLP([19, 4, 1], "relu")), "ds", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="built as 'ds', not 'unf'"):
        save_rule(make_rule("ds"), "unf", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="custom signatures"):
        save_rule(make_rule("unf", LINEAR_SIGNATURES[:1]), "unf", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="does not take"):
        make_rule("ds", widths=3)


def test_rule_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no rule file"):
        load_rule(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_rule(tmp_path / "bad.safetensors")
    save_rule(make_rule("ds"), "ds", tmp_path / "ds.safetensors")
    from safetensors.torch import load_file, save_file
    save_file(load_file(tmp_path / "ds.safetensors"), tmp_path / "wrong.safetensors", metadata={"optimizer": "unf",
                                                                                                 "n_layers": "2"})
    with pytest.raises(ValueError, match="does not match the 'unf' rule"):
        load_rule(tmp_path / "wrong.safetensors")
    save_file(load_file(tmp_path / "ds.safetensors"), tmp_path / "anon.safetensors")
    with pytest.raises(ValueError, match="names optimizer None"):
        load_rule(tmp_path / "anon.safetensors")
    with pytest.raises(ValueError, match="unknown optimizer"):
        save_rule(make_rule("ds"), "adam", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no shipped optimizer named 'nope'"):
        pretrained("nope", make_mlp([64, 32, 10], "relu"))


@pytest.mark.parametrize("name", ["mlp-small", "digits-mlp-v0.2"])
def test_shipped_optimizers_train_a_fresh_mlp(name):
    """Each shipped rule, as a drop-in on an MLP and seed it never saw, cuts the test loss of the digits task
    by over 80% in 150 steps (the full race against tuned Adam is `gradmetanet run lopt`)."""
    from gradmetanet.lopt import DigitsMLPTask, describe
    assert name in available()
    assert describe(name)["optimizer"] == "gradmetanet_ds" and "lopt" in describe(name)["command"]
    task = DigitsMLPTask()
    torch.manual_seed(12345)
    model = make_mlp([64, 32, 10], "relu")
    opt = pretrained(name, model)
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        start = F.cross_entropy(model(task.x_test), task.y_test).item()
    for _ in range(150):
        x, y = (t[0] for t in task.sample_batch(1, gen))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.close()
    with torch.no_grad():
        end = F.cross_entropy(model(task.x_test), task.y_test).item()
    assert end < 0.2 * start, (start, end)


def test_ship_records_provenance_and_pretrained_binds_a_model(tmp_path, monkeypatch):
    from gradmetanet.lopt import rule_files as shipped
    monkeypatch.setattr(shipped, "PRETRAINED_DIR", tmp_path / "pretrained")
    save_rule(make_rule("gradmetanet_ds"), "gradmetanet_ds", tmp_path / "run.safetensors", {"config": "{}"})
    shipped.ship(tmp_path / "run.safetensors", "toy", "gradmetanet run lopt --preset tiny")
    assert shipped.available() == ["toy"]
    described = shipped.describe("toy")
    assert json.loads(described.pop("rule"))["set_size"] == 32
    assert described == {"optimizer": "gradmetanet_ds", "config": "{}", "command": "gradmetanet run lopt --preset tiny"}
    model = make_mlp([5, 4, 3], "relu")
    opt = shipped.pretrained("toy", model)
    assert not any(p.requires_grad for p in opt.rule.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 5)), torch.randint(3, (8,))).backward()
    opt.step()
    opt.close()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_renamed_digits_optimizer_loads_its_replacement_with_a_warning():
    from gradmetanet.lopt import describe
    model = make_mlp([64, 32, 10], "relu")
    with pytest.warns(FutureWarning, match="replaced by 'mlp-small'.*'digits-mlp-v0.2'"):
        opt = pretrained("digits-mlp", model)
    new = pretrained("mlp-small", model)
    for a, b in zip(opt.rule.state_dict().values(), new.rule.state_dict().values()):
        assert torch.equal(a, b)
    opt.close()
    new.close()
    with pytest.warns(FutureWarning):
        assert describe("digits-mlp") == describe("mlp-small")
    assert "digits-mlp" not in available()
