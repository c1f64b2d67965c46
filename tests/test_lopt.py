"""Learned optimizers: features, the update rule, and torch.optim behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gradmetanet.models.mlp import make_mlp
from gradmetanet.data import load_digits_split
from gradmetanet.lopt import (LearnedOptimizer, N_FEATURES, NetworkOptimizer, deepsets_rule, gradmetanet_ds_rule,
                              gradmetanet_unf_rule, learnable_sgdm, parameter_features, unf_rule)
from gradmetanet.lopt.features import time_features
from gradmetanet.testing import check_symmetry, distance
from gradmetanet import spec_of


def test_features_shape_time_and_scale_invariance():
    torch.manual_seed(0)
    p, g, m = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3, 6)
    feats = parameter_features(p, g, m, step=7)
    assert feats.shape == (5, 3, N_FEATURES) == (5, 3, 19)
    scaled = parameter_features(1000 * p, 1000 * g, 1000 * m, step=7)
    torch.testing.assert_close(feats, scaled, atol=1e-5, rtol=1e-5)     # per-tensor RMS normalisation
    t = time_features(torch.tensor([0, 10, 1000]))
    assert torch.all(t[0] == 0) and torch.all(t[2] >= t[1]) and t.shape == (3, 11)


def test_learnable_sgdm_is_sgd_with_momentum():
    torch.manual_seed(0)
    model = make_mlp([4, 6, 3], "tanh")
    twin = copy.deepcopy(model)
    mine = learnable_sgdm(model.parameters(), alpha=0.05, mu=0.8)
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.8)
    x, y = torch.randn(16, 4), torch.randint(3, (16,))
    for _ in range(6):
        for net, opt in ((model, mine), (twin, ref)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _digits_steps(model, opt, x, y, steps):
    for i in range(steps):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(x)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return loss.item()


def test_deepsets_optimizer_drop_in_trains_and_resumes_exactly():
    x, y, _, _ = load_digits_split()
    torch.manual_seed(0)
    model = make_mlp([64, 32, 10], "relu")
    opt = LearnedOptimizer(model.parameters(), deepsets_rule())
    with torch.no_grad():
        start = F.cross_entropy(model(x), y).item()
    _digits_steps(model, opt, x, y, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _digits_steps(model, opt, x, y, 25)
    with torch.no_grad():
        end = F.cross_entropy(model(x), y).item()
    assert end < 0.5 * start, (start, end)          # the untrained rule still descends (momentum SGD core)
    # resume from the step-5 checkpoint in fresh objects: the same trajectory, exactly
    torch.manual_seed(1)
    resumed = make_mlp([64, 32, 10], "relu")
    resumed.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(resumed.parameters(), deepsets_rule())
    opt2.load_state_dict(saved_opt)
    _digits_steps(resumed, opt2, x, y, 25)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rule_is_differentiable_for_meta_training():
    """The unrolled inner loss depends on every meta-parameter (what PES or backprop meta-training needs)."""
    torch.manual_seed(0)
    rule = deepsets_rule()
    w = torch.randn(5, 3)
    x, target = torch.randn(32, 3), torch.randn(32, 5)
    state = rule.init_state({"w": w})
    for step in range(3):
        w_leaf = w.detach().requires_grad_() if step == 0 else w
        loss = F.mse_loss(x @ w_leaf.T, target)
        (g,) = torch.autograd.grad(loss, w_leaf, create_graph=True)
        new, state = rule({"w": w_leaf}, {"w": g}, state, torch.tensor(step))
        w = new["w"]
    final = F.mse_loss(x @ w.T, target)
    grads = torch.autograd.grad(final, list(rule.parameters()), allow_unused=True)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(gr.abs().sum() > 0 for gr in grads)


def test_errors():
    model = make_mlp([3, 2])
    opt = LearnedOptimizer(model.parameters(), deepsets_rule())
    model(torch.full((2, 3), float("nan"))).sum().backward()
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
    with pytest.raises(KeyError, match="no 'rule' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    with pytest.raises(ValueError, match="alpha > 0"):
        learnable_sgdm(model.parameters(), alpha=-1.0)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        LearnedOptimizer(model.parameters(), deepsets_rule(), lr=-1.0)


def _linreg_trainer(checkpoint=None, steps=150):
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.lopt.pes import MetaTrainer, PESConfig
    from gradmetanet.lopt.tasks import LinearRegressionTask
    torch.manual_seed(0)
    rule = UpdateRule(alpha=0.01, mu=0.5)
    config = PESConfig(pairs=8, sigma=0.1, truncation=5, horizon=10, meta_lr=3e-2, meta_steps=steps,
                       checkpoint_every=3)
    return MetaTrainer(LinearRegressionTask(), rule, config, checkpoint), rule


def test_pes_meta_training_reduces_the_meta_loss():
    """Learnable SGDM on the 2-parameter regression: the meta-loss (mean training loss over each
    truncation, the first steps' losses included, which no optimizer changes) falls by over 15%."""
    trainer, rule = _linreg_trainer()
    history = trainer.train(progress=False)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    assert rule.alpha.item() > 0.01                    # it learned to take larger steps


def test_pes_resume_is_exact_and_bad_checkpoints_are_refused(tmp_path):
    uninterrupted, rule_a = _linreg_trainer(steps=6)
    uninterrupted.train(progress=False)
    path = tmp_path / "meta.ckpt"
    first, _ = _linreg_trainer(path, steps=6)
    first.train(steps=3, progress=False)                 # "killed" after the step-3 checkpoint
    resumed, rule_b = _linreg_trainer(path, steps=6)
    assert resumed.step == 3
    resumed.train(progress=False)
    for a, b in zip(rule_a.parameters(), rule_b.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert resumed.history == uninterrupted.history
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.lopt.pes import MetaTrainer, PESConfig
    from gradmetanet.lopt.tasks import LinearRegressionTask
    with pytest.raises(ValueError, match="another PES configuration"):
        MetaTrainer(LinearRegressionTask(), UpdateRule(alpha=0.01, mu=0.5), PESConfig(pairs=2), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        _linreg_trainer(path)


def test_task_decomposed_gradients_match_gradient_capture():
    from gradmetanet import GradientCapture
    from gradmetanet.lopt import DigitsMLPTask
    task = DigitsMLPTask(batch_size=16)
    gen = torch.Generator().manual_seed(0)
    params = {k: v[0] for k, v in task.init_params(1, gen).items()}
    x, y = (t[0] for t in task.sample_batch(1, gen))
    grads, feats, loss = task.grads_and_features(params, (x, y))
    torch.testing.assert_close(loss, task.loss(params, (x, y)))
    model = make_mlp([64, 32, 10], "relu")
    model.load_state_dict(params)
    with GradientCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(feats, torch.cat(list(cap.gradients.neuron_features().values()), 1))
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def _gmn_optimizer(model, seed=0):
    torch.manual_seed(seed)
    return NetworkOptimizer(model, gradmetanet_ds_rule(beta=0.1))


RULES = {
    "ds": lambda: deepsets_rule(beta=0.1),
    "unf": lambda: unf_rule(beta=0.1),
    "gradmetanet_ds": lambda: gradmetanet_ds_rule(beta=0.1),
    "gradmetanet_unf": lambda: gradmetanet_unf_rule(beta=0.1),
}


@pytest.mark.parametrize("rule_name", list(RULES))
def test_learned_updates_are_permutation_equivariant(rule_name):
    """Symmetry harness on update rules: two steps from hidden-permuted parameters give the permuted result.

    Rules that read the network's structure (UNF, GradMetaNet) must also notice an input-neuron permutation
    (DS works entry by entry with per-tensor statistics, so every axis permutation commutes with it)."""
    torch.manual_seed(0)
    sizes = [5, 7, 9, 3]
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(3, (16,))
    spec = spec_of(make_mlp(sizes, "tanh"))
    initial = make_mlp(sizes, "tanh").double().state_dict()

    def two_steps(params, rule=None):
        net = make_mlp(sizes, "tanh").double()
        net.load_state_dict(params)
        torch.manual_seed(0)
        opt = learnable_sgdm(net.parameters()) if rule is None else NetworkOptimizer(net, RULES[rule_name]().double())
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        if rule is not None:
            opt.close()
        return {k: v.detach() for k, v in net.state_dict().items()}

    def move(params, element, sp):
        return sp.transform_parameters(params, element)

    structural = rule_name != "ds"
    check_symmetry(spec, lambda p: two_steps(p, rule_name), initial, move, move, group="perm", atol=1e-9,
                   sensitivity=("fixed",) if structural else ())
    # the learned term changes the update (else equivariance would hold trivially)
    assert distance(two_steps(initial, rule_name), two_steps(initial)) > 1e-4


def test_structure_reading_rules_need_a_network_optimizer():
    with pytest.raises(TypeError, match="NetworkOptimizer"):
        LearnedOptimizer(make_mlp([3, 4, 2]).parameters(), unf_rule())


def test_gradmetanet_optimizer_drop_in_and_errors():
    from gradmetanet import CaptureError
    x, y, x_test, y_test = load_digits_split()
    torch.manual_seed(0)
    model = make_mlp([64, 32, 10], "relu")
    opt = _gmn_optimizer(model)
    with torch.no_grad():
        start = F.cross_entropy(model(x_test), y_test).item()
    for i in range(30):
        idx = torch.arange(i * 40, (i + 1) * 40)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():                               # evaluation between steps is ignored by the capture
            end = F.cross_entropy(model(x_test), y_test).item()
    assert end < 0.75 * start, (start, end)       # an untrained rule with beta = 0.1 still descends
    with pytest.raises(CaptureError, match="no fresh decomposed gradients"):
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x[:16]), y[:16]).backward()       # a batch smaller than the GradMetaNet's set works
    opt.step()
    opt.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_pes_runs_with_the_gradmetanet_rule():
    from gradmetanet.lopt import DigitsMLPTask, MetaTrainer, PESConfig
    torch.manual_seed(0)
    rule = gradmetanet_ds_rule()
    before = [p.detach().clone() for p in rule.parameters()]
    trainer = MetaTrainer(DigitsMLPTask(batch_size=32), rule,
                          PESConfig(pairs=2, truncation=3, horizon=6, meta_lr=1e-2, meta_steps=3))
    history = trainer.train(progress=False)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    assert any(not torch.equal(a, b) for a, b in zip(before, rule.parameters()))


def test_pes_staggers_the_pairs_over_their_episodes():
    """Fresh meta-training spreads the pairs over episode phases (truncation boundaries); the two runs
    of a pair stay together (same steps, same data: identical parameters under the same meta-parameters),
    and without staggering every run starts at step 0."""
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.lopt.pes import MetaTrainer, PESConfig
    from gradmetanet.lopt.tasks import LinearRegressionTask
    config = PESConfig(pairs=8, truncation=5, horizon=40, meta_steps=1)
    runs = MetaTrainer(LinearRegressionTask(), UpdateRule(), config).pes.runs
    steps = runs.step
    assert torch.all(steps % 5 == 0) and len(set(steps[:8].tolist())) > 2
    torch.testing.assert_close(steps[:8], steps[8:])
    torch.testing.assert_close(runs.params["w"][:8], runs.params["w"][8:], atol=0, rtol=0)
    plain = MetaTrainer(LinearRegressionTask(), UpdateRule(), PESConfig(pairs=8, truncation=5, horizon=40,
                                                                        stagger=False))
    assert torch.all(plain.pes.runs.step == 0)


def test_validation_split_and_objective():
    """The held-out split is disjoint from training; the validation objective needs one and says so."""
    from gradmetanet.lopt import DigitsMLPTask, MetaTrainer, PESConfig
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.lopt.tasks import LinearRegressionTask
    full, task = DigitsMLPTask(batch_size=16), DigitsMLPTask(batch_size=16, validation_fraction=0.2)
    assert len(task.x_val) == round(0.2 * len(full.x_train))
    assert len(task.x_val) + len(task.x_train) == len(full.x_train)
    train_rows = {tuple(r.tolist()) for r in task.x_train}
    assert not any(tuple(r.tolist()) in train_rows for r in task.x_val[:50])
    config = PESConfig(pairs=2, truncation=2, horizon=4, meta_steps=2, objective="validation")
    history = MetaTrainer(task, UpdateRule(), config).train(progress=False)
    assert len(history) == 2 and all(h > 0 for h in history)
    with pytest.raises(NotImplementedError, match="no validation data"):
        MetaTrainer(LinearRegressionTask(), UpdateRule(), config)
    with pytest.raises(NotImplementedError, match="no validation data"):
        MetaTrainer(full, UpdateRule(), config)
    with pytest.raises(ValueError, match="objective must be"):
        MetaTrainer(task, UpdateRule(), PESConfig(objective="test"))


def test_warm_started_gradmetanet_rule_computes_the_source_rule():
    """GradMetaNet + DS warm-started from a (perturbed) DS gives the same updates (its GradMetaNet features
    enter through zero weights until meta-training moves them)."""
    from gradmetanet.lopt.optimizers import warm_start
    torch.manual_seed(0)
    ds, gmn = deepsets_rule(), gradmetanet_ds_rule()
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(0.1 * torch.randn_like(p))
    warm_start(gmn, ds)
    x, y = torch.randn(40, 64), torch.randint(10, (40,))
    models = [make_mlp([64, 32, 10], "relu") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [NetworkOptimizer(models[0], ds), NetworkOptimizer(models[1], gmn)]
    for model, opt in zip(models, opts):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        opt.close()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot warm-start"):
        warm_start(unf_rule(), gmn)


def test_meta_validation_keeps_the_best_rule_across_a_resume(tmp_path):
    """Every `evaluate_every` steps the unperturbed rule is scored on fixed inner runs; the best survives a resume."""
    from gradmetanet.lopt.optimizers import UpdateRule
    from gradmetanet.lopt.pes import MetaTrainer, PESConfig
    from gradmetanet.lopt.tasks import LinearRegressionTask

    def trainer(steps):
        torch.manual_seed(0)
        config = PESConfig(pairs=4, sigma=0.1, truncation=5, horizon=10, meta_lr=3e-2, meta_steps=steps,
                           checkpoint_every=2, evaluate_every=2, loss_clip=100.0)
        return MetaTrainer(LinearRegressionTask(), UpdateRule(alpha=0.01, mu=0.5), config, tmp_path / "m.ckpt")
    first = trainer(4)
    first.train(progress=False)
    assert [s for s, _ in first.validation] == [2, 4]
    assert first.best["loss"] == min(loss for _, loss in first.validation)
    assert first.meta_validate() == first.meta_validate()                 # fixed runs: deterministic
    resumed = trainer(8)
    assert resumed.best["step"] == first.best["step"]
    resumed.train(progress=False)
    assert [s for s, _ in resumed.validation] == [2, 4, 6, 8]
    best = resumed.best_rule_state()
    assert resumed.best["loss"] == min(loss for _, loss in resumed.validation)
    assert set(best) == set(resumed.rule.state_dict())
