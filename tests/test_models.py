"""The small causal transformer of the language-model task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gradmetanet.models import CausalTransformer


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal_transformer_is_causal_and_learns(norm):
    torch.manual_seed(0)
    model = CausalTransformer(vocab=11, norm=norm)
    ids = torch.randint(11, (3, 8))
    logits = model(ids)
    assert logits.shape == (3, 8, 11)
    changed = ids.clone()
    changed[:, 5] = (ids[:, 5] + 1) % 11
    other = model(changed)
    torch.testing.assert_close(other[:, :5], logits[:, :5])          # the past does not see the future
    assert (other[:, 5:] - logits[:, 5:]).abs().max() > 1e-4
    # memorise one batch of next tokens: the loss must fall well below its start
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 11), ids[:, 1:].reshape(-1))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_tied_embeddings_and_errors():
    tied = CausalTransformer(vocab=7, tie=True)
    assert tied.unembed.weight is tied.embed.weight
    assert "unembed.weight" not in dict(tied.named_parameters())        # one parameter, named once
    untied = CausalTransformer(vocab=7)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 7 * 32
    with pytest.raises(ValueError, match="T <= max_len"):
        tied(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="must divide"):
        CausalTransformer(vocab=7, d=30, heads=4)
    with pytest.raises(ValueError, match="norm must be"):
        CausalTransformer(vocab=7, norm="sandwich")
