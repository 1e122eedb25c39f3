"""The lab's figures, one home for their shared parts: a headless figure, the accuracy-vs-compression axes
(evaluate's grid, a study's trials and Pareto front), and the atomic PNG write every plot ends with."""

from __future__ import annotations

from pathlib import Path

from kvzap_lab import io
from kvzap_lab.stats import compression_ratio

COMPRESSION_LABEL = "compression (fraction of KV pairs evicted)"


def figure(rows: int = 1, cols: int = 1, figsize: tuple[float, float] = (7, 4.5)):
    """A matplotlib figure drawn without a display: ``(fig, ax)``, or ``(fig, axes [rows, cols])`` for a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows == cols == 1:
        return plt.subplots(figsize=figsize)
    return plt.subplots(rows, cols, figsize=figsize, squeeze=False)


def accuracy_compression_axes(ax, ylabel: str = "accuracy", marker_at: float | None = None, legend_size: int = 8) -> None:
    """Label, bound and grid an accuracy-vs-compression plot, with a dotted line at compression ``marker_at``
    (e.g. 0.75, 4x) when given, then draw its legend."""
    if marker_at is not None:
        ax.axvline(marker_at, color="grey", linestyle=":", label=f"{compression_ratio(marker_at):g}x compression")
    ax.set(xlabel=COMPRESSION_LABEL, ylabel=ylabel, xlim=(-0.02, 1.0), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as a PNG atomically (a reader never sees half a file), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
