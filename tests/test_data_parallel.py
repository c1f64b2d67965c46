"""Experiments under torchrun (issue 25): two gloo processes train data-parallel and give the table one process
gives, up to the order of floating-point sums; rank 0 alone writes; a folder they wrote resumes in one process;
an experiment whose loop is not data-parallel is refused by name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gradmetanet.cli import main
from gradmetanet.metanets.training import fit_regression


def regression_fit(rows_seen: list[int]):
    """A linear model fitted to 45 noisy targets (batches of 8, a last batch of 5); ``rows_seen`` collects how many
    rows each forward of this process reads."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(75, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(75, 2, generator=gen,
                                                                                          dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2).double()

    def predict(m, idx):
        rows_seen.append(len(idx))
        return m(x[idx])
    fit = fit_regression(model, predict, y, torch.arange(45), torch.arange(45, 60), torch.arange(60, 75), 4, 8, 0.05,
                         seed=3, schedule="cosine")
    return model, fit


def _fit_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    seen: list[int] = []
    model, fit = regression_fit(seen)
    torch.save({"state": model.state_dict(), "val": fit.val_history, "train": fit.train_history, "seen": seen,
                "test": fit.test},
               f"{out}.{rank}")
    from gradmetanet.distributed import shut_down
    shut_down()
    os._exit(0)     # results are on disk; skip interpreter teardown, which gloo's threads can abort


def test_fit_regression_splits_every_batch_and_takes_the_one_process_step(tmp_path, monkeypatch):
    """Each of two processes reads its half of every training batch (4 of 8; the last batch of 5 as 3 and 2) and of
    the validation networks (8 and 7 of 15), and the fit ends where one process's does: same weights, curves and
    test error up to summation order."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_fit_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=True) for r in range(2)]
    one_seen: list[int] = []
    model, fit = regression_fit(one_seen)
    train_rows = [n for n in one_seen if n in (8, 5)][:6]           # the first epoch's batches: 8 x 5, then 5
    assert train_rows == [8, 8, 8, 8, 8, 5]
    assert ranks[0]["seen"][:6] == [4, 4, 4, 4, 4, 3] and ranks[1]["seen"][:6] == [4, 4, 4, 4, 4, 2]
    assert one_seen[6] == 15 and ranks[0]["seen"][6] == 8 and ranks[1]["seen"][6] == 7     # sharded evaluation
    for r in ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(r["val"]), torch.tensor(fit.val_history), rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.tensor(r["train"]), torch.tensor(fit.train_history), rtol=1e-10, atol=0)
        assert r["test"] == pytest.approx(fit.test, rel=1e-10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "gradmetanet.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=400,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})


def numbers(tree, path=""):
    """Every number of a JSON tree, keyed by its path."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{path}/{i}").items()}
    return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.parametrize("experiment, section", [("curvature", "models"), ("inr-edit", "models"),
                                                 ("amortize", "mlp-tanh"), ("lora", "targets")])
def test_two_processes_give_the_table_of_one(tmp_path, experiment, section):
    threads = torch.get_num_threads()
    try:      # one thread, as each rank runs: float32 products blocked for two threads round differently
        assert main(["run", experiment, "--preset", "tiny", "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    done = torchrun("run", experiment, "--preset", "tiny", "--out", str(tmp_path / "two"))
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "fit/s" not in l)[:4000]
    assert done.stdout.count("wrote ") == 1, "rank 0 alone reports"
    one, two = (json.loads((tmp_path / d / "results.json").read_text())[section] for d in ("one", "two"))
    a, b = numbers(one), numbers(two)
    assert a.keys() == b.keys()
    for key in a:
        if "seconds" not in key:       # sparsity and R^2 are 1 - a ratio near 1: float32 round-off, not relative
            near_one = any(word in key for word in ("sparsity", "r2"))
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-5 if near_one else 1e-9), key
    def table() -> list[str]:                                    # timings (LoRA's speed line) are measured anew
        return [line for line in (tmp_path / "two" / "table.md").read_text().splitlines() if "µs" not in line]

    before = table()                                             # resumed in one process: every cell read back
    assert main(["run", experiment, "--preset", "tiny", "--out", str(tmp_path / "two")]) == 0
    assert table() == before


def test_an_experiment_that_is_not_data_parallel_is_refused_by_name(tmp_path):
    done = torchrun("run", "lopt", "--preset", "tiny", "--out", str(tmp_path / "a"))
    assert done.returncode != 0
    assert "`run lopt` does not run under torchrun" in done.stderr
