"""The scaffolding every experiment's PNG shares: an off-screen figure, labels, legend, grid, saved and closed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["figure", "learning_curves"]


@contextmanager
def figure(path: str | Path, xlabel: str, ylabel: str, title: str, size: tuple[float, float] = (6.4, 4.2),
           xlog: bool = False, ylog: bool = False, legend_outside: bool = False) -> Iterator[object]:
    """Yield matplotlib axes to draw on; on exit label them, add a legend (beside the axes with
    ``legend_outside``) and a grid, save ``path`` (130 dpi)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=130)
    try:
        yield ax
        if xlog:
            ax.set_xscale("log")
        if ylog:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if legend_outside:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        else:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both" if xlog or ylog else "major")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def learning_curves(path: str | Path, curves: dict[str, tuple[list[float], list[float]]], ylabel: str,
                    title: str) -> None:
    """One PNG of training (dashed) and validation (solid) loss per epoch, ``curves {label: (train, val)}``, with
    each validation curve's best epoch marked; log scale. A training curve may be empty (cells recorded before
    training losses were kept)."""
    with figure(path, "epoch", ylabel, title, size=(7.5, 4.5), ylog=True, legend_outside=True) as ax:
        for i, (label, (train, val)) in enumerate(curves.items()):
            colour = f"C{i % 10}"
            ax.plot(range(1, len(val) + 1), val, color=colour, label=f"{label} (val)")
            ax.plot(range(1, len(train) + 1), train, color=colour, linestyle="--", alpha=0.6)
            best = min(range(len(val)), key=val.__getitem__)
            ax.plot([best + 1], [val[best]], marker="o", color=colour)
        ax.plot([], [], color="grey", linestyle="--", alpha=0.6, label="training loss (dashed)")
