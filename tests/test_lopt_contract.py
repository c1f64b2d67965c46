"""The torch.optim contract of the learned optimizers (issue 10): every item fails on version 0.1's code."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradmetanet import CaptureError
from gradmetanet.models.mlp import make_mlp
from gradmetanet.lopt import LearnedOptimizer, NetworkOptimizer, deepsets_rule, gradmetanet_ds_rule, learnable_sgdm


def batch(b: int = 40, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, generator=gen, dtype=dtype), torch.randint(3, (b,), generator=gen)


def train(model, opt, steps: int = 3, b: int = 40, seed: int = 0):
    for i in range(steps):
        x, y = batch(b, seed + i, next(model.parameters()).dtype)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def gmn(model):
    return NetworkOptimizer(model, gradmetanet_ds_rule(beta=0.1))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_param_groups_carry_lr_and_it_scales_the_learned_step():
    deltas = []
    for lr in (1.0, 0.5):
        torch.manual_seed(0)
        model = make_mlp([5, 8, 3])
        before = snapshot(model)
        opt = LearnedOptimizer(model.parameters(), deepsets_rule(beta=0.1), lr=lr)
        assert opt.param_groups[0]["lr"] == lr
        train(model, opt, steps=1)
        deltas.append(torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before]))
    torch.testing.assert_close(deltas[1], 0.5 * deltas[0])


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.0),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=3, cycle_momentum=False,
                                                  pct_start=0.1, final_div_factor=1e12),
], ids=["StepLR", "CosineAnnealingLR", "OneCycleLR"])
def test_schedulers_drive_the_learned_step(make_scheduler):
    """Each scheduler brings lr to (almost) zero after its schedule: the parameters then stop moving."""
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    opt = gmn(model)
    scheduler = make_scheduler(opt)
    for i in range(2):
        train(model, opt, steps=1, seed=i)
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 1e-6
    before = snapshot(model)
    train(model, opt, steps=1, seed=5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-7, rtol=0)
    opt.close()


def test_reduce_lr_on_plateau_reads_and_writes_lr():
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    opt = LearnedOptimizer(model.parameters(), deepsets_rule())
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    for _ in range(3):
        train(model, opt, steps=1)
        scheduler.step(1.0)                      # a loss that never improves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("kind", ["learned", "network"])
def test_step_hooks_fire_once(kind):
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    LearnedOptimizer(make_mlp([5, 8, 3]).parameters(), deepsets_rule())      # another one exists
    opt = LearnedOptimizer(model.parameters(), deepsets_rule()) if kind == "learned" else gmn(model)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    train(model, opt, steps=1)
    assert calls == ["pre", "post"]


def test_float64_models_and_state_loaded_across_dtypes():
    torch.manual_seed(0)
    model32 = make_mlp([5, 8, 3])
    opt32 = gmn(model32)
    train(model32, opt32, steps=2)
    model64 = make_mlp([5, 8, 3]).double()
    model64.load_state_dict(model32.state_dict())
    opt64 = gmn(model64)
    opt64.load_state_dict(opt32.state_dict())
    assert all(v.dtype == torch.float64 for v in opt64.state["__rule__"]["momentum"].unsqueeze(0))
    train(model64, opt64, steps=2, seed=2)
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model64.parameters())


def test_parameters_without_gradients_are_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(make_mlp([5, 8, 3]), nn.Linear(3, 3))             # the second head is never used
    model[0][0].weight.requires_grad_(False)                                 # a frozen weight
    frozen, unused = model[0][0].weight.detach().clone(), model[1].weight.detach().clone()
    opt = LearnedOptimizer(model.parameters(), deepsets_rule(beta=0.1))
    before = model[0][2].weight.detach().clone()
    for i in range(3):
        x, y = batch(seed=i)
        opt.zero_grad()
        F.cross_entropy(model[0](x), y).backward()
        opt.step()
    assert torch.equal(model[0][0].weight, frozen) and torch.equal(model[1].weight, unused)
    assert not torch.equal(model[0][2].weight, before)


def test_gradmetanet_rules_train_the_layers_that_are_not_frozen():
    """A frozen body and a trained head (0.6.1 refused): the rule reads the head's gradients, the body stays as it
    is, and the space between them counts as fixed (the frozen layer cannot move with it)."""
    torch.manual_seed(0)
    model = make_mlp([5, 8, 6, 3])
    model[0].requires_grad_(False)
    body = model[0].weight.detach().clone()
    opt = gmn(model)
    assert [s.name for s in opt.spec.sites] == ["2", "4"]
    assert [s.group.name for s in opt.spec.spaces] == ["trivial", "scale_perm", "trivial"]
    head = model[4].weight.detach().clone()
    for i in range(3):
        x, y = batch(seed=i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(model[0].weight, body) and not torch.equal(model[4].weight, head)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every captured layer is frozen"):
        gmn(model)


def test_add_param_group_trains_the_new_parameters():
    torch.manual_seed(0)
    body, head = make_mlp([5, 8]), nn.Linear(8, 3)
    opt = LearnedOptimizer(body.parameters(), deepsets_rule(beta=0.1))
    model = nn.Sequential(body, nn.Tanh(), head)
    train(model, opt, steps=1)
    opt.add_param_group({"params": head.parameters(), "lr": 0.5})
    before = head.weight.detach().clone()
    train(model, opt, steps=2, seed=1)
    assert not torch.equal(head.weight, before) and opt.param_groups[1]["lr"] == 0.5
    with pytest.raises(ValueError, match="NetworkOptimizer"):
        gmn(make_mlp([5, 8, 3])).add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_any_batch_size_and_a_forward_without_backward():
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    opt = gmn(model)
    for b in (40, 7, 64, 1):                 # last batches smaller than the rule's set of 32, and larger
        x, y = batch(b, seed=b)
        with torch.enable_grad():
            model(batch(9, seed=99)[0]).sum()      # an evaluation with gradients on, never backpropagated
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_round_trip_through_torch_save_resumes_identically():
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    opt = gmn(model)
    train(model, opt, steps=2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, steps=3, seed=10)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = make_mlp([5, 8, 3])
    twin.load_state_dict(saved["model"])
    twin_opt = gmn(twin)
    twin_opt.load_state_dict(saved["opt"])
    train(twin, twin_opt, steps=3, seed=10)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gradient_clipping_is_respected():
    updates = []
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        model = make_mlp([5, 8, 3])
        opt = learnable_sgdm(model.parameters(), alpha=0.1, mu=0.5)
        before = snapshot(model)
        x, y = batch()
        F.cross_entropy(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        updates.append(sum((model.state_dict()[k] - before[k]).norm() ** 2 for k in before) ** 0.5)
    assert updates[1] < 0.1 * updates[0] and updates[1] == pytest.approx(0.1 * 1e-3, rel=1e-3)


def test_gradient_accumulation_works_for_plain_rules_and_is_refused_clearly_for_gradmetanet():
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    opt = LearnedOptimizer(model.parameters(), deepsets_rule())
    opt.zero_grad()
    for i in range(2):
        x, y = batch(seed=i)
        F.cross_entropy(model(x), y).backward()
    opt.step()
    model = make_mlp([5, 8, 3])
    opt = gmn(model)
    opt.zero_grad()
    x, y = batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(CaptureError, match="accumulat"):
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_skipped_step_and_a_second_optimizer_on_the_same_model():
    torch.manual_seed(0)
    model = make_mlp([5, 8, 3])
    first = gmn(model)                            # a notebook re-run leaves the first one attached
    with pytest.warns(UserWarning, match="detached"):
        opt = gmn(model)
    assert not first.capture.active
    x, y = batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()       # step() skipped (say the loss looked bad)
    train(model, opt, steps=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
