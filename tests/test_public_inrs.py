"""The public INRs of the weight-space benchmark (DWSNets' archive layout): read whole or as a sharded zoo, with the
benchmark's splits, the same networks either way; files of another architecture refused by name; ws-bench reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import vmap

from gradmetanet.cli import main
from gradmetanet.experiments import ws_bench
from gradmetanet.zoos import ShardedZoo, load_public_inr_zoo
from gradmetanet.zoos.inr import render
from gradmetanet.zoos.public_inrs import PublicInrSource, find_public_inrs, read_inr_state

WIDTHS = (2, 32, 32, 1)


def write_public_inrs(root: Path, training: int, testing: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """INR files as the archive holds them (state-dict names of the releases' own module, ``seq.<i>.*``), labels
    cycling 0..9; returns the parameters written, training files first, each group in sorted path order."""
    gen = torch.Generator().manual_seed(seed)
    written = []
    for split, count in (("training", training), ("testing", testing)):
        for i in range(count):
            folder = root / f"mnist_png_{split}_{i % 10}_{1000 + i}" / "checkpoints"
            folder.mkdir(parents=True)
            state = {}
            for layer, (d_in, d_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
                state[f"seq.{layer}.weight"] = torch.randn(d_out, d_in, generator=gen) / d_in
                state[f"seq.{layer}.bias"] = torch.randn(d_out, generator=gen) * 0.1
            torch.save(state, folder / "model_final.pth")
            written.append((folder.parent.name, state))
    order = sorted(range(training), key=lambda i: written[i][0]) + \
        sorted(range(training, training + testing), key=lambda i: written[i][0])
    return [{f"{2 * k}.{kind}": written[i][1][f"seq.{k}.{kind}"] for k in range(3) for kind in ("weight", "bias")}
            for i in order]


def test_the_archive_reads_into_the_inr_zoo_with_the_benchmark_splits(tmp_path):
    nets = write_public_inrs(tmp_path, training=24, testing=6)
    zoo = load_public_inr_zoo(tmp_path)
    assert len(zoo) == 30 and {k: tuple(v.shape[1:]) for k, v in zoo.params.items()} == \
        {"0.weight": (32, 2), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,), "4.weight": (1, 32), "4.bias": (1,)}
    for i, net in enumerate(nets):
        assert all(torch.equal(zoo.params[k][i], v) for k, v in net.items())
    files = find_public_inrs(PublicInrSource(str(tmp_path)))
    assert zoo.labels.tolist() == [int(p.parent.parent.name.split("_")[-2]) for p, _, _ in files]
    assert zoo.splits["test"].tolist() == list(range(24, 30))              # the testing files are the test split
    assert len(zoo.splits["val"]) == 2 and len(zoo.splits["train"]) == 22   # a twelfth of training held out
    assert sorted(torch.cat(list(zoo.splits.values())).tolist()) == list(range(30))
    rendered = (vmap(render)(zoo.params).clamp(0, 1) * 255).round().to(torch.uint8).reshape(30, 28, 28)
    assert torch.equal(zoo.images, rendered) and zoo.psnr.isnan().all()
    assert len(load_public_inr_zoo(tmp_path, limit=4)) == 8


def test_the_sharded_folder_holds_the_same_inrs_and_splits(tmp_path):
    write_public_inrs(tmp_path / "archive", training=13, testing=4)
    assert main(["zoo", "make", "public-inrs", "--from", str(tmp_path / "archive"), "--out", str(tmp_path / "z"),
                 "--shard-size", "5", "--set", "val_size=3"]) == 0
    sharded = ShardedZoo(tmp_path / "z")
    assert sharded.manifest["shards"] == 4 and sharded.verify() == []
    whole, read = load_public_inr_zoo(tmp_path / "archive", val_size=3), load_public_inr_zoo(tmp_path / "z")
    assert all(torch.equal(whole.params[k], read.params[k]) for k in whole.params)
    assert torch.equal(whole.labels, read.labels) and torch.equal(whole.images, read.images)
    assert all(torch.equal(whole.splits[s], read.splits[s]) for s in ("train", "val", "test"))
    with pytest.raises(ValueError, match="holds a classifier_zoo, not a public_inrs"):
        manifest = json.loads((tmp_path / "z" / "manifest.json").read_text())
        (tmp_path / "z" / "manifest.json").write_text(json.dumps(manifest | {"zoo": "classifier_zoo"}))
        load_public_inr_zoo(tmp_path / "z")


def test_files_of_another_architecture_and_empty_folders_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no INR files"):
        load_public_inr_zoo(tmp_path)
    folder = tmp_path / "mnist_png_training_3_7" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"seq.0.weight": torch.zeros(64, 2), "seq.0.bias": torch.zeros(64)}, folder / "model_final.pth")
    with pytest.raises(ValueError, match="model_final.pth holds .*not the SIREN 2-32-32-1"):
        read_inr_state(folder / "model_final.pth")


def test_ws_bench_reads_the_published_inrs(tmp_path):
    write_public_inrs(tmp_path / "archive", training=36, testing=12)
    config = ws_bench.config_from_preset("tiny", inr_dir=str(tmp_path / "archive"), backbones=("probe", "dws"))
    results = ws_bench.run(config, tmp_path / "run", progress=False)
    assert results["zoo"]["inrs"] == 48 and results["zoo"]["source"] == "published INRs"
    assert results["zoo"]["splits"] == {"train": 33, "val": 3, "test": 12}
    table = (tmp_path / "run" / "table.md").read_text()
    assert "the published INRs" in table and "this run read the published INRs" in table
