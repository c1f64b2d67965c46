"""PES under torch.distributed: two gloo processes estimate what one process estimates, and checkpoints
written by two processes resume in one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradmetanet.lopt.optimizers import UpdateRule, deepsets_rule
from gradmetanet.lopt.pes import PES, MetaTrainer, PESConfig
from gradmetanet.lopt.tasks import LinearRegressionTask

CONFIG = dict(pairs=4, sigma=0.1, truncation=5, horizon=10, meta_lr=3e-2, checkpoint_every=1)


def make_rule(kind: str) -> UpdateRule:
    torch.manual_seed(0)
    return UpdateRule(alpha=0.01, mu=0.5) if kind == "sgdm" else deepsets_rule(beta=0.1)


def make_task(kind: str):
    if kind == "family":       # two members, two pairs each: each process advances one pair of each member
        from gradmetanet.lopt import task_family
        return task_family(("digits:4:8", "mnist1d:4x4:8"))
    return LinearRegressionTask()


def estimates(kind: str) -> tuple[torch.Tensor, float]:
    """Two PES estimates (after staggering) with this process's shard, if any."""
    from gradmetanet.lopt.distributed import current_shard
    rule = make_rule(kind)
    gen = torch.Generator().manual_seed(0)
    pes = PES(make_task(kind), rule, 4, 0.1, 5, 10, gen, shard=current_shard(4))
    theta = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    pes.stagger(theta, gen)
    g1, _ = pes.estimate(theta, gen)
    g2, loss = pes.estimate(theta + 0.01, gen)
    return torch.stack([g1, g2]), loss


def worker(rank: int, store: str, out: str, kind: str, checkpoint: str) -> None:
    from gradmetanet.lopt.distributed import shut_down
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    g, loss = estimates(kind)
    trainer = MetaTrainer(make_task(kind), make_rule(kind), PESConfig(meta_steps=3, **CONFIG), checkpoint)
    trainer.train(progress=False)
    if rank == 0:
        torch.save({"g": g, "loss": loss, "rule": trainer.rule.state_dict(), "history": trainer.history}, out)
    shut_down()
    os._exit(0)     # the results are on disk; skip interpreter teardown, which gloo's threads have aborted in CI


@pytest.mark.parametrize("kind", ["ds", "family"])
def test_two_processes_estimate_and_resume_like_one(tmp_path, kind, monkeypatch):
    """A single task, and a task family (each process advancing its share of every member's pairs)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")        # loopback, whatever the host name resolves to
    mp.spawn(worker, args=(str(tmp_path / "store"), str(tmp_path / "out.pt"), kind, str(tmp_path / "two.ckpt")),
             nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    g, loss = estimates(kind)
    torch.testing.assert_close(two["g"], g, atol=1e-6, rtol=1e-5)          # same particles, same estimate
    assert abs(two["loss"] - loss) < 1e-6
    one = MetaTrainer(make_task(kind), make_rule(kind), PESConfig(meta_steps=5, **CONFIG), tmp_path / "one.ckpt")
    one.train(steps=3, progress=False)
    for k, v in one.rule.state_dict().items():
        torch.testing.assert_close(two["rule"][k], v, atol=1e-5, rtol=1e-4)     # Adam amplifies sum-order noise
    # the checkpoint two processes wrote resumes in one process, on the one-process trajectory
    resumed = MetaTrainer(make_task(kind), make_rule(kind), PESConfig(meta_steps=5, **CONFIG),
                          tmp_path / "two.ckpt")
    assert resumed.step == 3
    resumed.train(progress=False)
    one.train(progress=False)
    for k, v in one.rule.state_dict().items():
        torch.testing.assert_close(resumed.rule.state_dict()[k], v, atol=5e-5, rtol=1e-4)
