"""Sharded zoos (issue 25): any number of processes make the same zoo, an interrupted one resumes, a damaged shard
is named, and reads touch only the shards they need. Networks depend on their index alone."""

from __future__ import annotations

import json
import os
from dataclasses import replace
import subprocess
import sys

import pytest
import torch

from gradmetanet import spec_of
from gradmetanet.cli import main
from gradmetanet.features import WeightSpaceFeatures
from gradmetanet.metanets import DWSNet, fit
from gradmetanet.zoos.classifier import (ClassifierZooConfig, generate_classifier_zoo, load_sharded_classifier_zoo,
                                             make_sharded_classifier_zoo)
from gradmetanet.zoos import ShardedZoo, ZooDamaged

CONFIG = ClassifierZooConfig(architecture="mlp", activation="relu", networks=10, steps=(3, 12))
SETTINGS = ["--set", "networks=10", "--set", "architecture='mlp'", "--set", "activation='relu'", "--set", "steps=[3,12]"]


@pytest.fixture
def one_thread():
    """The processes a test starts run one thread each; the zoo it makes in this process must too (intra-op threads
    change float reduction order, about 1e-7 in float32)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def make_in_two_processes(kind: str, folder, shard_size: int, settings: list[str]) -> list[str]:
    """``gradmetanet zoo make KIND`` in two processes as torchrun starts them (RANK, WORLD_SIZE), at once, one thread
    each; their standard outputs."""
    code = "import sys; from gradmetanet.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, "zoo", "make", kind, "--out", str(folder),
                               "--shard-size", str(shard_size), *settings],
                              env=os.environ | {"RANK": str(r), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [out for out, _ in outs]


def test_two_processes_make_the_zoo_one_process_makes(tmp_path):
    """Two processes as torchrun starts them (RANK, WORLD_SIZE), at once: every shard is made once, and the zoo is
    bit for bit the one trained in memory in one chunk."""
    outs = make_in_two_processes("classifier", tmp_path / "z", 3, SETTINGS)
    assert "made 2 shard(s)" in outs[0] and "made 2 shard(s)" in outs[1]
    sharded = load_sharded_classifier_zoo(tmp_path / "z")
    memory = generate_classifier_zoo(CONFIG, chunk=10, progress=False)
    assert same(sharded.params, memory.params) and torch.equal(sharded.accuracy, memory.accuracy)
    assert same(sharded.networks, memory.networks) and same(sharded.images, memory.images)


def test_a_network_depends_on_its_index_alone():
    small = generate_classifier_zoo(ClassifierZooConfig(architecture="mlp", activation="relu", networks=4,
                                                        steps=(3, 12)), progress=False)
    big = generate_classifier_zoo(CONFIG, chunk=3, progress=False)
    assert same(small.params, {k: v[:4] for k, v in big.params.items()})


def test_resume_damage_and_lazy_reads(tmp_path, capsys):
    folder = tmp_path / "z"
    assert make_sharded_classifier_zoo(CONFIG, folder, 4, progress=False) == [0, 1, 2]
    stamp = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    (folder / "shard-00001.json").unlink()                           # as if stopped while writing shard 1
    assert ShardedZoo(folder).missing() == [1]
    assert make_sharded_classifier_zoo(CONFIG, folder, 4, progress=False) == [1]
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == stamp

    zoo = ShardedZoo(folder)
    opened = []
    original = zoo._checked
    zoo._checked = lambda stem: opened.append(stem) or original(stem)
    picked = zoo.networks([9, 1])                                    # shards 2 and 0, in the order asked
    assert opened == ["shard-00000", "shard-00002"]
    whole = zoo.tensors()
    for name, tensor in picked.items():                              # rows from a shard's range, in order
        assert torch.equal(tensor, whole[name][[9, 1]]), name
    spread = torch.tensor([9, 0, 3, 8, 1, 3])
    for name, tensor in zoo.networks(spread, ["accuracy", "lr"]).items():
        assert torch.equal(tensor, whole[name][spread]), name
    assert torch.equal(zoo.column("accuracy"), whole["accuracy"])

    data = bytearray((folder / "shard-00002.safetensors").read_bytes())
    data[-5] ^= 0xFF                                                 # one byte of the tensor data, header intact
    (folder / "shard-00002.safetensors").write_bytes(bytes(data))
    with pytest.raises(ZooDamaged, match="shard-00002.safetensors does not match its SHA-256"):
        ShardedZoo(folder).networks([8])
    assert ShardedZoo(folder).networks([0])["accuracy"].shape == (1,)  # the intact shards still read
    assert main(["zoo", "verify", str(folder)]) == 1
    assert "shard-00002" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds another zoo .*networks"):
        make_sharded_classifier_zoo(ClassifierZooConfig(architecture="mlp", activation="relu", networks=11,
                                                        steps=(3, 12)), folder, 4, progress=False)


def test_a_metanetwork_trains_on_the_shards_as_on_the_zoo_in_memory(tmp_path):
    """``fit`` on ``ShardedZoo.weights`` (read batch by batch from the shards, each tensor divided by its RMS over
    the training networks, computed chunk by chunk) gives the fit on the same features held in memory, exactly."""
    folder = tmp_path / "z"
    make_sharded_classifier_zoo(CONFIG, folder, 3, progress=False)
    zoo = load_sharded_classifier_zoo(folder)
    spec = spec_of(zoo.template(), zoo.data()[0][:2])
    sharded = ShardedZoo(folder)
    train = torch.arange(6)
    rms = sharded.weights(spec).tensor_rms(train, chunk=4)
    for name, value in rms.items():
        torch.testing.assert_close(value, zoo.params[name][train].square().mean().sqrt())
    targets = zoo.accuracy[:, None]
    results = []
    for inputs in (sharded.weights(spec, scale=rms),
                   WeightSpaceFeatures(spec, {k: (v / rms[k]).unsqueeze(-1) for k, v in zoo.params.items()})):
        torch.manual_seed(0)
        model = DWSNet(spec, 1, 1, hidden=4, layers=2, readout="invariant")
        results.append((fit(model, inputs, targets, epochs=3, batch_size=4, progress=False), model.state_dict()))
    (streamed, a), (held, b) = results
    assert streamed.val_history == held.val_history and streamed.test == held.test
    assert same(a, b)


def test_the_public_small_cnn_zoo_files_become_a_sharded_zoo(tmp_path):
    """``gradmetanet zoo make small-cnn --from DIR`` writes the chosen networks of the public files shard by shard:
    the same weights and accuracies as ``load_small_cnn_zoo``, verified, and read lazily for training."""
    from small_cnn_files import write_small_cnn_zoo
    from gradmetanet.models import small_cnn_zoo_template
    from gradmetanet.zoos.classifier import load_small_cnn_zoo

    template = small_cnn_zoo_template("tanh")
    gen = torch.Generator().manual_seed(0)
    nets = [{k: torch.randn(v.shape, generator=gen) for k, v in template.state_dict().items()} for _ in range(7)]
    write_small_cnn_zoo(tmp_path, nets, [f"86,tanh,{0.1 * i}" for i in range(6)] + ["85,tanh,0.9"])
    assert main(["zoo", "make", "small-cnn", "--from", str(tmp_path), "--out", str(tmp_path / "z"),
                 "--shard-size", "4"]) == 0
    zoo = ShardedZoo(tmp_path / "z")
    assert len(zoo) == 6 and zoo.manifest["shards"] == 2 and not zoo.verify()
    params, metrics = load_small_cnn_zoo(tmp_path)
    read = zoo.networks(torch.arange(6))
    for name, value in params.items():
        assert torch.equal(read[f"params/{name}"], value), name
    assert torch.equal(zoo.column("accuracy"), metrics["test_accuracy"].float())
    spec = spec_of(template, torch.randn(2, 1, 28, 28))
    assert zoo.weights(spec).select(torch.tensor([5, 0])).tensors["0.weight"].shape == (2, 16, 1, 3, 3, 1)
    with pytest.raises(SystemExit, match="needs --from"):
        main(["zoo", "make", "small-cnn", "--out", str(tmp_path / "y")])


def test_an_inr_zoo_made_by_two_processes_is_the_one_process_zoo_and_experiments_read_it(tmp_path, one_thread):
    """``zoo make inr``: each INR starts from its own seed, so two processes with shards of 8 make bit for bit the zoo
    one process makes in one shard; the folder reads back as an INR zoo with its splits, and ws-bench reads it."""
    from gradmetanet.zoos.inr import InrZooConfig, load_sharded_inr_zoo, make_sharded_inr_zoo
    from gradmetanet.experiments import ws_bench
    settings = ["--set", "n_images=30", "--set", "steps=4"]
    make_in_two_processes("inr", tmp_path / "two", 8, settings)
    config = InrZooConfig(n_images=30, steps=4)
    assert make_sharded_inr_zoo(config, tmp_path / "one", shard_size=30, progress=False) == [0]
    two, one = load_sharded_inr_zoo(tmp_path / "two"), load_sharded_inr_zoo(tmp_path / "one")
    assert same(two.params, one.params) and torch.equal(two.labels, one.labels) and same(two.splits, one.splits)
    assert torch.equal(two.psnr, one.psnr) and two.psnr.isfinite().all() and len(two) == 30
    first = InrZooConfig(n_images=8, steps=4)                 # an INR depends on its index alone
    make_sharded_inr_zoo(first, tmp_path / "first", shard_size=8, progress=False)
    assert same(load_sharded_inr_zoo(tmp_path / "first").params, {k: v[:8] for k, v in one.params.items()})
    results = ws_bench.run(ws_bench.config_from_preset("tiny", inr_dir=str(tmp_path / "two"), backbones=("probe",)),
                           tmp_path / "run", progress=False)
    assert results["zoo"]["inrs"] == 30 and results["zoo"]["source"] == "fitted here"


def test_a_siren_zoo_made_by_two_processes_is_the_one_process_zoo_and_gradmetanet_streams_it(tmp_path, one_thread):
    """``zoo make siren``: network i from its own seed, so two processes with shards of 3 make bit for bit the zoo of
    one shard; GradMetaNet trains on its gradient sets read batch by batch (``ShardedZoo.gradients``) exactly as on
    the sets held in memory."""
    from gradmetanet.metanets import GradMetaNet
    from gradmetanet.models.siren import siren_spec
    from gradmetanet.zoos.siren import SirenZooConfig, load_sharded_siren_zoo, make_sharded_siren_zoo
    from gradmetanet.features.neurons import GradientBatch
    settings = ["--set", "n_networks=10", "--set", "set_size=6", "--set", "target_points=12"]
    make_in_two_processes("siren", tmp_path / "two", 3, settings)
    config = SirenZooConfig(n_networks=10, set_size=6, target_points=12)
    make_sharded_siren_zoo(config, tmp_path / "one", shard_size=10, progress=False)
    two, one = load_sharded_siren_zoo(tmp_path / "two"), load_sharded_siren_zoo(tmp_path / "one")
    assert same(two.params, one.params)
    for name in ("points", "features", "target", "standard"):
        assert torch.equal(getattr(two, name), getattr(one, name)), name
    spec = siren_spec(config.widths)
    results = []
    for inputs in (ShardedZoo(tmp_path / "two").gradients(spec), GradientBatch(spec, two.features)):
        torch.manual_seed(0)
        model = GradMetaNet(hidden=4, set_layers=1, neuron_layers=1, out_features=1, head="invariant")
        results.append((fit(model, inputs, two.target[:, :1], epochs=2, batch_size=4, progress=False),
                        model.state_dict()))
    (streamed, a), (held, b) = results
    assert streamed.val_history == held.val_history and same(a, b)


LORA_ZOOS = {
    "lora": (["n_loras=8", "base_steps=20", "steps=[3,9]", "data_sizes=[32,64]"],
             "gradmetanet.zoos.lora", "LoraZooConfig", "make_sharded_lora_zoo", "load_sharded_lora_zoo"),
    "lora-lm": (["n_loras=8", "base_steps=5", "steps=[3,6]", "data_sizes=[256,512]", "d=8"],
                "gradmetanet.zoos.lora_lm", "LmLoraZooConfig", "make_sharded_lm_lora_zoo", "load_sharded_lm_lora_zoo"),
}


@pytest.mark.parametrize("kind", list(LORA_ZOOS))
def test_a_lora_zoo_made_by_two_processes_is_the_one_process_zoo(tmp_path, one_thread, kind):
    """``zoo make lora`` / ``lora-lm``: the base network once (common), each fine-tune from its own seed (task,
    initialisation and batches), so two processes with shards of 3 make bit for bit the zoo of one shard, and the
    first fine-tunes of a bigger zoo are those of a smaller one."""
    import importlib
    fields, module_name, config_name, make_name, load_name = LORA_ZOOS[kind]
    module = importlib.import_module(module_name)
    make, load = getattr(module, make_name), getattr(module, load_name)
    make_in_two_processes(kind, tmp_path / "two", 3, [arg for f in fields for arg in ("--set", f)])
    values = {k: v for k, v in (f.split("=") for f in fields)}
    config = getattr(module, config_name)(**{k: tuple(json.loads(v)) if v.startswith("[") else int(v)
                                            for k, v in values.items()})
    make(config, tmp_path / "one", shard_size=8, progress=False)
    two, one = load(tmp_path / "two"), load(tmp_path / "one")
    assert same(two.tensors(), one.tensors()) and len(two) == 8
    assert getattr(two, two.quality).isfinite().all() and two.membership.sum(1).min() >= 1
    make(replace(config, n_loras=3), tmp_path / "three", shard_size=3, progress=False)
    first = load(tmp_path / "three")
    assert all(torch.equal(first.A[s], one.A[s][:3]) and torch.equal(first.B[s], one.B[s][:3]) for s in one.sites)
