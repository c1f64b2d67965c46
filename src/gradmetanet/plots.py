"""The scaffolding every experiment's PNG shares: an off-screen figure, labels, legend, grid, saved and closed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["figure"]


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
