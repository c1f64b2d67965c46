"""The README's user examples run as written, and do what the README says."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    """The code block that follows ``<!-- example: NAME -->`` in the README."""
    match = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def test_ten_lines_example_shapes_are_as_commented():
    scope: dict = {}
    exec(compile(example("ten-lines"), "README:ten-lines", "exec"), scope)
    gs, fisher, out = scope["gs"], scope["fisher"], scope["out"]
    assert gs.activations["0"].shape == (128, 1, 64) and gs.output_grads["0"].shape == (128, 1, 32)
    assert fisher["0.weight"].shape == (32, 64)
    assert out["0.weight"].shape == (32, 64, 1) and out["2.bias"].shape == (10, 1)
    assert [(s.name, s.size, s.group.name) for s in gs.spec.spaces] == [
        ("s0", 64, "trivial"), ("s1", 32, "scale_perm"), ("s2", 10, "trivial")]


def test_predict_your_own_target_example(capsys):
    scope: dict = {}
    exec(compile(example("own-target"), "README:own-target", "exec"), scope)
    result, y = scope["result"], scope["y"]
    assert result.test < 0.3 * y.var().item(), result.test          # far better than a constant
    assert "test MSE" in capsys.readouterr().out


def test_extractor_example_registers_a_new_kind(capsys):
    from gradmetanet.capture import registry

    saved = dict(registry._REGISTRY)
    try:
        scope: dict = {}
        exec(compile(example("extractor"), "README:extractor", "exec"), scope)
        printed = capsys.readouterr().out
        assert "('s1', 8, 'sign_perm')" in printed and "GradientSet(16 examples" in printed
        net = scope["net"].double()                  # the new kind captures exactly, as nn.Linear does
        x = torch.randn(6, 5, dtype=torch.float64)
        with scope["GradientCapture"](net, loss_reduction="sum") as cap:
            net(x).square().sum().backward()
        params = {k: v.detach() for k, v in net.named_parameters()}
        ref = vmap(grad(lambda p, xi: functional_call(net, p, (xi[None],)).square().sum()), in_dims=(None, 0))(
            params, x)
        for name, value in cap.gradients.per_example_grads().items():
            torch.testing.assert_close(value, ref[name], atol=1e-10, rtol=0)
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def test_learned_optimizer_example_trains_with_a_scheduler():
    scope: dict = {}
    exec(compile(example("learned-optimizer"), "README:learned-optimizer", "exec"), scope)
    model, x_test, y_test = scope["model"], scope["x_test"], scope["y_test"]
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x_test), y_test).item()
    assert loss < 0.5, loss                                         # ln 10 = 2.3 at the start
    assert scope["opt"].param_groups[0]["lr"] < 1e-3               # the schedule reached its end


def test_lora_example_is_invariant_and_round_trips(capsys):
    scope: dict = {}
    exec(compile(example("lora"), "README:lora", "exec"), scope)
    assert "(32, 64)" in capsys.readouterr().out
    assert scope["adapter"].paths == ["0", "2", "4"]


def test_transformer_example_captures_every_parameter():
    scope: dict = {}
    exec(compile(example("transformer"), "README:transformer", "exec"), scope)
    model, grads, norms, out = scope["model"], scope["grads"], scope["norms"], scope["out"]
    assert grads["blocks.0.attn.in_proj_weight"].shape == (16, 96, 32)
    assert set(out) == set(grads) == {n for n, _ in model.named_parameters()}
    dense = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    torch.testing.assert_close(norms, dense, rtol=1e-4, atol=1e-6)


def test_amortize_example_runs_and_trains_the_tuner():
    scope: dict = {}
    exec(compile(example("amortize"), "README:amortize", "exec"), scope)
    assert scope["better"]["0.weight"].shape == (8, 16, 1, 3, 3)
    assert scope["tuner"].scales.grad.abs().sum() > 0 and scope["tuner"].backbone.embed_edge.weight.grad.abs().sum() > 0


def test_testing_example_passes_a_metanetwork_and_names_what_a_wrong_one_breaks(capsys):
    scope: dict = {}
    exec(compile(example("testing"), "README:testing", "exec"), scope)
    assert "not invariant to the order of the examples" in capsys.readouterr().out
