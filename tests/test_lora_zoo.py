"""The LoRA zoo: labels are what they say (the recorded accuracy is the merged network's), and the cache."""

from __future__ import annotations

import torch

from gradmetanet.models.mlp import make_mlp
from gradmetanet.data.digits import load_digits_split
from gradmetanet.zoos.lora import SITES, LoraZooConfig, load_or_generate_lora_zoo

TINY = LoraZooConfig(n_loras=24, base_steps=40, steps=(5, 15), data_sizes=(16, 64))


def test_tiny_zoo_labels_and_cache(tmp_path):
    zoo = load_or_generate_lora_zoo(TINY, tmp_path, progress=False)
    assert len(zoo) == 24 and zoo.layer_shapes == {"0": (32, 64), "2": (32, 32), "4": (10, 32)}
    sizes = zoo.membership.sum(1)
    assert ((sizes >= 2) & (sizes <= 6)).all() and ((zoo.data_size >= 16) & (zoo.data_size <= 64)).all()
    assert ((zoo.accuracy >= 0) & (zoo.accuracy <= 1)).all() and zoo.B["0"].abs().sum() > 0
    # the recorded accuracy is the merged network's, evaluated the ordinary way
    _, _, x_test, y_test = load_digits_split(seed=TINY.split_seed)
    model = make_mlp([64, 32, 32, 10], "relu")
    state = dict(zoo.base)
    dw = zoo.batch(slice(3, 4)).delta_weights()
    for site in SITES:
        state[f"{site}.weight"] = state[f"{site}.weight"] + dw[site][0]
    model.load_state_dict(state)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean()
    torch.testing.assert_close(accuracy, zoo.accuracy[3])
    again = load_or_generate_lora_zoo(TINY, tmp_path, progress=False)           # read from the cache
    assert torch.equal(again.A["2"], zoo.A["2"]) and torch.equal(again.accuracy, zoo.accuracy)
