"""The learned optimizer under DistributedDataParallel: two gloo processes, each with half of every batch, keep
identical replicas and follow the one-process run on the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from gradmetanet.lopt import pretrained

STEPS = 20


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(sizes: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` batches of ``sum(sizes)`` examples (the same for every process)."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(sum(sizes), 8, generator=gen), torch.randint(4, (sum(sizes),), generator=gen))
            for _ in range(STEPS)]


def train(model: nn.Module, data, rows: slice) -> nn.Module:
    opt = pretrained("mlp-small", model)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    opt.close()
    return model


def worker(rank: int, store: str, out: str, sizes: tuple[int, int]) -> None:
    from gradmetanet.lopt.distributed import shut_down
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(make_model())
    start = sum(sizes[:rank])
    train(model, batches(sizes), slice(start, start + sizes[rank]))
    torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, f"{out}.{rank}")
    shut_down()
    os._exit(0)     # the results are on disk; skip interpreter teardown (gloo's threads, see test_pes_distributed)


def test_ddp_replicas_stay_identical_and_match_one_process(tmp_path, monkeypatch):
    """Equal halves (16 + 16: the rule's 32-example set is the whole global batch) and unequal ones (20 + 12)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    for sizes in ((16, 16), (20, 12)):
        out = tmp_path / f"params{sizes[0]}"
        mp.spawn(worker, args=(str(tmp_path / f"store{sizes[0]}"), str(out), sizes), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
        start = make_model().state_dict()
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), f"replicas drifted apart in {name}"
            assert not torch.equal(value, start[name])
        if sizes[0] == sizes[1]:        # DDP averages per rank, which is the batch mean only for equal halves
            one = train(make_model(), batches(sizes), slice(None)).state_dict()
            for name, value in ranks[0].items():
                torch.testing.assert_close(value, one[name], atol=1e-5, rtol=1e-4)
