"""Hugging Face model families captured whole with their default inputs (``model(input_ids)``), tiny random
configs in float64: every per-example gradient equals ``torch.func``'s, and the traced spec is true (moving the
parameters by a random element of every space's group leaves the logits unchanged).

Llama's RMSNorm normalises in float32 even in a float64 model: an error of the model's own (about 1e-7 relative),
which the tests remove by patching its forward to keep the input's dtype (the same formula); the extractor
computes ``x_hat`` in the input's dtype (at least float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from gradmetanet import GradientCapture

VOCAB, T, B = 40, 6, 3


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def llama(tied: bool):
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=16, tie_word_embeddings=tied, bos_token_id=0,
                                        eos_token_id=0, pad_token_id=0))


def bert():
    return BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=VOCAB,
                                                    max_position_embeddings=16, num_labels=3))


FAMILIES = {"gpt2": gpt2, "llama-tied": lambda: llama(True), "llama-untied": lambda: llama(False), "bert": bert}


def loss_of(name: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each example's loss (summed over tokens for the language models), averaged over the batch."""
    if name == "bert":
        return F.cross_entropy(logits, targets[:, 0] % 3)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1).mean()


@pytest.fixture(autouse=True)
def rmsnorm_in_the_input_dtype(monkeypatch):
    from transformers.models.llama import modeling_llama

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def build(name: str):
    torch.manual_seed(0)
    model = FAMILIES[name]().double().eval()          # eval: no dropout (per-example gradients of one forward)
    with torch.no_grad():                             # untrained norms and biases are 1 and 0: make them generic
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_example_grads_of_every_parameter_equal_torch_func(name):
    model = build(name)
    ids, targets = torch.randint(VOCAB, (B, T)), torch.randint(VOCAB, (B, T))
    with GradientCapture(model) as cap:
        loss_of(name, model(ids).logits, targets).backward()
    gs = cap.gradients
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, i, t):
        return loss_of(name, functional_call(model, p, (i[None],)).logits, t[None])
    expected = vmap(grad(one), in_dims=(None, 0, 0))(params, ids, targets)
    got = gs.per_example_grads()
    assert set(got) == set(expected), set(expected) ^ set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-9, rtol=1e-7, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_traced_spec_is_true(name):
    model = build(name)
    ids = torch.randint(VOCAB, (B, T))
    with GradientCapture(model) as cap:
        model(ids).logits.sum().backward()
    spec = cap.gradients.spec
    assert any(space.permutable for space in spec.spaces), [s.group.name for s in spec.spaces]
    params = {k: v.detach() for k, v in model.named_parameters()}
    moved = spec.transform_parameters(params, spec.sample(torch.Generator().manual_seed(1)))
    assert any(not torch.equal(moved[k], params[k]) for k in params)
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, moved, (ids,)).logits, model(ids).logits, atol=1e-9,
                                   rtol=1e-9)


def test_hf_labels_loss_rows_and_the_rescale_to_each_examples_own_token_mean():
    """``model(ids, labels=...)`` averages over every valid token of the batch (``-100`` pads): row i is then
    ``b / N`` times example i's token-sum gradient; ``scale_examples(N / (b n_i))`` gives its own token mean's."""
    model = build("gpt2")
    ids = torch.randint(VOCAB, (B, T))
    labels = ids.clone()
    labels[0, 3:] = -100
    labels[2, 5:] = -100
    with GradientCapture(model) as cap:
        model(ids, labels=labels).loss.backward()
    valid = (labels[:, 1:] != -100).sum(1)                 # GPT-2 shifts: token t predicts label t + 1
    own = cap.gradients.scale_examples(valid.sum() / (B * valid.double())).per_example_grads()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, i, lab):
        return functional_call(model, p, (i[None],), {"labels": lab[None]}).loss
    expected = vmap(grad(one), in_dims=(None, 0, 0))(params, ids, labels)
    for key in expected:       # HF's loss casts the logits to float32 (.float()): float32 tolerances
        torch.testing.assert_close(own[key], expected[key], atol=1e-6, rtol=1e-5)
    raw = cap.gradients.per_example_grads()["transformer.wte.weight"][0]
    assert not torch.allclose(raw, expected["transformer.wte.weight"][0], atol=1e-4)   # rows differ without it


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=8, patch_size=4, num_channels=1,
                                                num_labels=3)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() <= 1 or p.shape[0] == 1:        # norms, biases and the zero-initialised tables
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_vit_cls_token_position_table_and_patches_per_example():
    """ViT (0.6.1 refused it): the cls token and the position table are parameters read by every example, the
    patch projection a convolution whose output positions are the tokens; all equal torch.func in float64, the
    traced spec is true, and GradMetaNet reads the gradient set."""
    from gradmetanet import GradientBatch
    from gradmetanet.metanets import GradMetaNet

    model = vit()
    x, y = torch.randn(B, 1, 8, 8, dtype=torch.float64), torch.randint(3, (B,))
    with GradientCapture(model) as cap:
        F.cross_entropy(model(x).logits, y).backward()
    gs = cap.gradients
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)).logits, yi[None])
    expected = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    got = gs.per_example_grads()
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-9, rtol=1e-7, msg=lambda m: f"{key}: {m}")
    spec = gs.spec
    assert ("perm", 16) in [(s.group.name, s.size) for s in spec.spaces]
    moved = spec.transform_parameters(params, spec.sample(torch.Generator().manual_seed(1)))
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, moved, (x,)).logits, model(x).logits, atol=1e-9, rtol=1e-9)
        out = GradMetaNet(hidden=8, out_features=1).double()(GradientBatch.from_gradient_sets([gs]))
    assert out["vit.embeddings.position_embeddings"].shape == (1, 1, 5, 16, 1)


def test_vit_with_an_interpolated_position_table_is_refused_by_name():
    """Interpolating the position table (another image size) or masking patches changes what each token reads from
    the table: refused, naming the option, instead of captured as if the table were read row by row."""
    from gradmetanet.core.spec import UnsupportedModuleError

    model = vit()
    x = torch.randn(B, 1, 12, 12, dtype=torch.float64)
    with pytest.raises(UnsupportedModuleError, match="interpolate_pos_encoding"):
        with GradientCapture(model) as cap:
            model(x, interpolate_pos_encoding=True).logits.sum().backward()
        cap.gradients
