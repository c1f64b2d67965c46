"""Meta-training on a task family: member tasks, their data, and PES runs spread over the members."""

from __future__ import annotations

import pytest
import torch

from gradmetanet.lopt import MetaTrainer, PESConfig, TaskFamily, classification_task, deepsets_rule, task_family
from gradmetanet.lopt.pes import PES


def test_classification_sets_are_seeded_splits_standardised_by_training_statistics():
    from gradmetanet.data import load_classification_split
    x_train, y_train, x_test, _ = load_classification_split("digits-std", seed=3)
    varying = x_train.std(0) > 0
    torch.testing.assert_close(x_train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-5, rtol=0)
    assert x_test.mean(0).abs().max() > 1e-3                       # the test set is scaled by training statistics
    unit = load_classification_split("digits", seed=3)[0]
    assert unit.min() >= 0 and unit.max() <= 1
    x1, y1, _, _ = load_classification_split("mnist1d", seed=0)
    x2, y2, _, _ = load_classification_split("mnist1d", seed=1)
    assert x1.shape == (3750, 40) and set(y1.tolist()) == set(range(10))
    assert not torch.equal(x1, x2) and torch.equal(x1, load_classification_split("mnist1d", seed=0)[0])
    with pytest.raises(ValueError, match="unknown classification set 'mnist'"):
        load_classification_split("mnist")


def test_member_names_build_the_mlp_they_describe():
    task = classification_task("digits-std:16x8:32")
    shapes = [tuple(p.shape) for p in task.make_model().parameters()]
    assert shapes == [(16, 64), (16,), (8, 16), (8,), (10, 8), (10,)]
    x, y = task.sample_batch(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 32, 64) and y.shape == (3, 32)
    params = task.init_params(2, torch.Generator())
    assert {k: tuple(v.shape) for k, v in params.items()}["2.weight"] == (2, 8, 16)
    for bad in ("digits:32", "digits:32:ab", "digits:0:8", "digits:32:0"):
        with pytest.raises(ValueError, match="DATASET:WIDTHS:BATCH|must be positive"):
            classification_task(bad)


def _estimate(task, pairs=2, seed=0):
    torch.manual_seed(0)
    rule = deepsets_rule()
    gen = torch.Generator().manual_seed(seed)
    pes = PES(task, rule, pairs=pairs, sigma=0.01, truncation=3, horizon=6, generator=gen, objective="validation")
    theta = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    return pes, [pes.estimate(theta, gen) for _ in range(3)]


def test_a_one_member_family_estimates_exactly_as_its_task():
    task = classification_task("digits:8:16", validation_fraction=0.2)
    _, alone = _estimate(task)
    _, family = _estimate(TaskFamily({"digits": task}))
    for (g_a, loss_a), (g_f, loss_f) in zip(alone, family):
        torch.testing.assert_close(g_f, g_a, atol=0, rtol=0)
        assert loss_f == loss_a


def test_pairs_are_spread_over_members_and_antithetic_twins_share_their_data():
    from gradmetanet.lopt.inner_runs import stack_meta_parameters
    family = task_family(("digits:8:16", "mnist1d:8x4:16"), validation_fraction=0.2)
    torch.manual_seed(0)
    rule = deepsets_rule()
    gen = torch.Generator().manual_seed(0)
    pes = PES(family, rule, pairs=4, sigma=0.01, truncation=3, horizon=6, generator=gen, objective="validation")
    runs = pes.runs
    assert [idx.tolist() for idx in runs.index] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert runs.groups[0].params["0.weight"].shape == (4, 8, 64)
    assert runs.groups[1].params["2.weight"].shape == (4, 4, 8)
    # the same meta-parameters for every run: a pair's two runs see the same init and batches, so equal losses
    theta = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    losses = runs.unroll(stack_meta_parameters(rule, theta.expand(8, -1)), 2, gen)
    torch.testing.assert_close(losses[:4], losses[4:], atol=0, rtol=0)
    assert len(set(losses[:4].tolist())) == 4
    assert torch.equal(runs.step, torch.full((8,), 2))
    g, loss = pes.estimate(theta, gen)
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and loss > 0


def test_family_meta_training_resumes_exactly(tmp_path):
    family = task_family(("digits:8:16", "mnist1d:8:16"), validation_fraction=0.2)
    config = PESConfig(pairs=2, truncation=2, horizon=4, meta_steps=4, checkpoint_every=1, objective="validation",
                       evaluate_every=2, evaluate_runs=1, meta_lr=1e-2)

    def trainer(path=None):
        torch.manual_seed(0)
        rule = deepsets_rule()
        return MetaTrainer(family, rule, config, path), rule

    straight, rule_a = trainer()
    straight.train(progress=False)
    first, _ = trainer(tmp_path / "meta.ckpt")
    first.train(steps=3, progress=False)
    resumed, rule_b = trainer(tmp_path / "meta.ckpt")
    assert resumed.step == 3
    resumed.train(progress=False)
    assert resumed.history == straight.history and resumed.validation == straight.validation
    for a, b in zip(rule_a.parameters(), rule_b.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_family_errors_name_the_cause():
    family = task_family(("digits:8:16", "mnist1d:8:16", "wine:4:8"), validation_fraction=0.2)
    with pytest.raises(ValueError, match="2 pairs cannot cover the 3 members"):
        MetaTrainer(family, deepsets_rule(), PESConfig(pairs=2, truncation=2, horizon=4))
    with pytest.raises(ValueError, match="must differ"):
        task_family(("digits:8:16", "digits:8:16"))
    with pytest.raises(ValueError, match="at least one member"):
        TaskFamily({})
    from gradmetanet.lopt.distributed import Shard
    from gradmetanet.lopt.task_family import FamilyRuns
    with pytest.raises(ValueError, match=r"split evenly: 3 pairs over 3 members gives \[1, 1, 1\]"):
        FamilyRuns(family, deepsets_rule(), 6, 4, torch.Generator(), antithetic=True, shard=Shard(0, 2, 3))
    from gradmetanet.experiments import lopt
    with pytest.raises(ValueError, match="needs its members"):
        lopt.config_from_preset("tiny", task="family")
    with pytest.raises(ValueError, match="one or the other"):
        lopt.config_from_preset("family-tiny", held_out=("digits:8:16",))


def test_a_family_is_not_one_task():
    family = task_family(("digits:8:16", "mnist1d:8:16"))
    with pytest.raises(TypeError, match="different parameter shapes"):
        family.init_params(2, torch.Generator())
    with pytest.raises(TypeError, match="different parameter shapes"):
        family.sample_batch(2, torch.Generator())
