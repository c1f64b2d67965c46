"""GradMetaNet reads every gradient set capture produces, equivariantly: a CNN classifier of the usual form
(convolutions at two resolutions before a linear head) and Hugging Face families (BERT's pooler reads one token
of six). Sites with different token counts meet per example (the token mean; docs/choices.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_hf_models as hf
from gradmetanet import GradientBatch, GradientCapture
from gradmetanet.metanets import GradMetaNet
from gradmetanet.testing import check_symmetry
from gradmetanet.testing import move_outputs as move_output


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


def captured(name: str):
    torch.manual_seed(0)
    if name == "cnn":
        model = cnn().double()
        x, loss = torch.randn(5, 1, 8, 8, dtype=torch.float64), lambda out: F.cross_entropy(out, torch.arange(5))
    elif name == "vit":
        model = hf.vit()
        x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
        loss = lambda out: F.cross_entropy(out.logits, torch.arange(5) % 3)      # noqa: E731
    else:
        model = hf.build(name)
        x = torch.randint(hf.VOCAB, (5, hf.T))
        targets = torch.randint(hf.VOCAB, (5, hf.T))
        loss = lambda out: hf.loss_of(name, out.logits, targets)          # noqa: E731
    with GradientCapture(model) as cap:
        loss(model(x)).backward()
    return cap.gradients


@pytest.mark.parametrize("name", ["cnn", "gpt2", "bert", "llama-tied", "vit"])
def test_gradmetanet_on_user_models_is_equivariant(name):
    gs = captured(name)
    torch.manual_seed(1)
    metanet = GradMetaNet(hidden=8, out_features=2).double()

    def run(gradients):
        return metanet(GradientBatch.from_gradient_sets([gradients]))

    def move_in(gradients, element, spec):
        return gradients.transform(element)
    with torch.no_grad():
        out = run(gs)
        assert set(out) == set(gs.spec.param_shapes())
        assert all(out[k].shape[1:-1] == s for k, s in gs.spec.param_shapes().items())
        check_symmetry(gs.spec, run, gs, move_in, move_output, group="perm", atol=1e-8,
                       sensitivity=("fixed",) if name == "cnn" else ())


def test_sites_with_different_token_counts_meet_per_example():
    """The CNN's first convolution writes 64 positions, the second reads 16, the head one: one row per example."""
    gs = captured("cnn")
    assert {a.shape[1] for a in gs.activations.values()} == {64, 16, 1}
    assert gs.neuron_tensor().shape == (5, gs.spec.n_neurons, 2)
    for name in ("gpt2", "llama-tied"):                    # equal token counts: tokens stay in the set axis
        same = captured(name)
        assert same.neuron_tensor().shape == (5 * hf.T, same.spec.n_neurons, 2)


@pytest.mark.parametrize("name", ["cnn", "gpt2", "bert-frozen-body", "vit"])
def test_the_shipped_learned_optimizer_trains_user_models(name):
    """``pretrained("mlp-small")`` on a CNN (0.6.1 raised at the first step), GPT-2, and BERT with its body frozen
    (only the classifier trains): a fixed batch's loss falls by 5% in 30 steps (ViT's only falls)."""
    from gradmetanet.lopt import pretrained

    torch.manual_seed(0)
    if name == "cnn":
        model, x, y = cnn(), torch.randn(16, 1, 8, 8), torch.arange(16) % 10
        loss = lambda: F.cross_entropy(model(x), y)                              # noqa: E731
    elif name == "vit":
        model, x, y = hf.vit().float(), torch.randn(16, 1, 8, 8), torch.arange(16) % 3
        loss = lambda: F.cross_entropy(model(x).logits, y)                       # noqa: E731
    else:
        model = hf.build(name.split("-")[0]).float()
        x, y = torch.randint(hf.VOCAB, (16, hf.T)), torch.randint(hf.VOCAB, (16, hf.T))
        if name == "gpt2":          # the usual token-mean loss (a sum over tokens makes steps 6x larger)
            loss = lambda: F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())     # noqa: E731
        else:
            loss = lambda: hf.loss_of("bert", model(x).logits, y)                       # noqa: E731
        if name == "bert-frozen-body":
            model.bert.requires_grad_(False)
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    opt = pretrained("mlp-small", model)
    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    opt.close()
    margin = 1.0 if name == "vit" else 0.95         # ViT: the MLP-trained rule moves it slowly (-1.7%)
    assert loss().item() < margin * first, (first, loss().item())
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())


def test_torch_compiled_models_capture_and_train_as_eager_ones():
    """``torch.compile`` (dynamo, eager backend: no C compiler needed in CI): the same per-example gradients as
    the eager model, and the shipped learned optimizer trains through the compiled module."""
    from gradmetanet.models.mlp import make_mlp
    from gradmetanet.lopt import pretrained

    torch.manual_seed(0)
    model = make_mlp([8, 16, 4], "relu")
    compiled = torch.compile(model, backend="eager")
    x, y = torch.randn(32, 8), torch.randint(4, (32,))
    grads = []
    for net in (model, compiled):
        with GradientCapture(model) as cap:
            F.cross_entropy(net(x), y).backward()
        grads.append(cap.gradients.per_example_grads())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])
    opt = pretrained("mlp-small", compiled)
    first = F.cross_entropy(compiled(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
    opt.close()
    assert F.cross_entropy(compiled(x), y).item() < 0.8 * first
