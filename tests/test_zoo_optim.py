"""The zoos' one vectorised trainer: each network's step equals ``torch.optim``'s on that network alone, with its
own rate (0 freezes it)."""

from __future__ import annotations

import pytest
import torch

from gradmetanet.zoos import adam_step, heavy_ball_step


def networks(n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(n, 4, 3, generator=gen), "b": torch.randn(n, 4, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]
    return params, grads


def one_by_one(params, grads, lr, make):
    """Each network stepped by a ``torch.optim`` optimiser of its own: ``{name: [N, *shape]}``."""
    out = {k: [] for k in params}
    for i in range(len(lr)):
        mine = {k: torch.nn.Parameter(v[i].clone()) for k, v in params.items()}
        opt = make(list(mine.values()), float(lr[i]))
        for g in grads:
            for k, p in mine.items():
                p.grad = g[k][i].clone()
            opt.step()
        for k, p in mine.items():
            out[k].append(p.detach())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("rule", ["adam", "heavy_ball"])
def test_every_network_takes_torch_optims_step_with_its_own_rate(rule):
    params, grads = networks()
    lr = torch.tensor([0.1, 0.0, 0.03])
    state: dict = {}
    stepped = params
    for t, g in enumerate(grads, start=1):
        if rule == "adam":
            stepped = adam_step(stepped, g, state, t, lr)
        else:
            stepped = heavy_ball_step(stepped, [g[k] for k in stepped], state.setdefault("v", {
                k: torch.zeros_like(v) for k, v in params.items()}), lr)
    make = ((lambda p, r: torch.optim.Adam(p, lr=r)) if rule == "adam" else
            (lambda p, r: torch.optim.SGD(p, lr=r, momentum=0.9)))
    expected = one_by_one(params, grads, lr, make)
    for k in params:
        torch.testing.assert_close(stepped[k], expected[k])
        torch.testing.assert_close(stepped[k][1], params[k][1], rtol=0, atol=0)     # rate 0: frozen
        assert not torch.equal(stepped[k][0], params[k][0])


def test_a_number_is_one_rate_for_every_network():
    params, grads = networks()
    with_number = adam_step(params, grads[0], {}, 1, 0.05)
    with_tensor = adam_step(params, grads[0], {}, 1, torch.full((3,), 0.05))
    for k in params:
        torch.testing.assert_close(with_number[k], with_tensor[k], rtol=0, atol=0)
