"""`gradmetanet capture-demo`: capture the decomposed gradients of a digits MLP and report what it cost."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.mlp import make_mlp
from .capture import GradientCapture
from .data import load_digits_split
from .timing import median_time


def run_capture_demo(batch_size: int = 128, hidden: int = 32, seed: int = 0) -> dict[str, float]:
    """Train nothing: one digits batch through a 64-hidden-10 MLP, plain vs captured backward."""
    torch.manual_seed(seed)
    x_train, y_train, _, _ = load_digits_split(seed=seed)
    x, y = x_train[:batch_size], y_train[:batch_size]
    model = make_mlp([64, hidden, 10], "relu")

    def plain() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    def captured() -> None:
        model.zero_grad()
        with GradientCapture(model) as cap:
            F.cross_entropy(model(x), y).backward()
        cap.gradients

    with GradientCapture(model) as cap:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    gs = cap.gradients
    print(f"base network: {model}")
    print(f"spec: {[(s.name, s.size, s.group.name) for s in gs.spec.spaces]}")
    for site in gs.spec.sites:
        print(f"  site {site.name!r}: a {list(gs.activations[site.name].shape)}, "
              f"g {list(gs.output_grads[site.name].shape)}")
    dense = gs.per_example_grads()
    err = max((gs.mean_grad()[n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    t_plain, t_capture = median_time(plain), median_time(captured)
    report = {
        "examples": gs.batch_size,
        "parameters": gs.spec.n_params,
        "factor_bytes": gs.nbytes(),
        "dense_per_example_bytes": sum(t.numel() * t.element_size() for t in dense.values()),
        "max_abs_error_mean_grad_vs_backward": err,
        "plain_backward_ms": 1e3 * t_plain,
        "captured_backward_ms": 1e3 * t_capture,
    }
    print(f"GradientSet: {report['factor_bytes'] / 1024:.1f} KiB for {gs.batch_size} examples; dense per-example "
          f"gradients would take {report['dense_per_example_bytes'] / 1024:.1f} KiB "
          f"({report['dense_per_example_bytes'] / report['factor_bytes']:.1f}x more)")
    print(f"mean_grad() vs param.grad: max |difference| = {err:.2e}")
    print(f"forward+backward: plain {report['plain_backward_ms']:.3f} ms, captured {report['captured_backward_ms']:.3f} ms "
          f"({t_capture / t_plain:.2f}x), median of 20, {torch.get_num_threads()} threads")
    return report
