"""Activation checkpointing: recomputed forwards during backward are not new examples. Non-reentrant
checkpointing (torch.utils.checkpoint and Hugging Face's gradient_checkpointing_enable) captures exactly what a
plain run captures; the reentrant mode is refused by name (0.6.1 said "forward after backward" or "no_grad")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import test_hf_models as hf
from gradmetanet import CaptureError, GradientCapture
from gradmetanet.lopt import pretrained


class Blocks(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def grads(model, x, y):
    with GradientCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    return cap.gradients.per_example_grads()


def test_non_reentrant_checkpointing_captures_what_a_plain_run_captures():
    torch.manual_seed(0)
    plain = Blocks(None).double()
    checkpointed = Blocks(False).double()
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(2, (5,))
    expected, got = grads(plain, x, y), grads(checkpointed, x, y)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-12, rtol=0)


def test_reentrant_checkpointing_is_refused_by_name():
    model = Blocks(True).double()
    x, y = torch.randn(5, 6, dtype=torch.float64, requires_grad=True), torch.randint(2, (5,))
    with pytest.raises(CaptureError, match="use_reentrant=False"):
        grads(model, x, y)
    opt = pretrained("mlp-small", model)
    with pytest.raises(CaptureError, match="use_reentrant=True"):
        F.cross_entropy(model(x), y).backward()
    opt.close()


def test_hugging_face_gradient_checkpointing_and_the_learned_optimizer():
    model = hf.build("gpt2").float().train()
    model.config.embd_pdrop = model.config.resid_pdrop = model.config.attn_pdrop = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ids, targets = torch.randint(hf.VOCAB, (4, hf.T)), torch.randint(hf.VOCAB, (4, hf.T))
    expected = grads_lm(model, ids, targets)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = grads_lm(model, ids, targets)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    opt = pretrained("mlp-small", model)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten()).backward()
        opt.step()
    opt.close()


def grads_lm(model, ids, targets):
    with GradientCapture(model) as cap:
        F.cross_entropy(model(ids).logits.flatten(0, 1), targets.flatten()).backward()
    return cap.gradients.per_example_grads()
