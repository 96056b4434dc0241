"""Plots (PNG, matplotlib on the Agg backend, imported lazily): calibration operating points, accuracy against
retain."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..evaluation.calibration import Point


def plot_calibration(
    points: Sequence[Point], chosen: Point, path: str | Path, *, title: str = ""
) -> None:
    """Accuracy and compute against exit rate, with the chosen point marked, as a PNG."""
    import matplotlib  # lazy: keeps the CLI's import fast

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(points, key=lambda p: p.exit_rate)
    x = [p.exit_rate for p in pts]
    rel = [p.relative_accuracy for p in pts]
    marker = "o" if len(pts) <= 40 else ""  # markers only help on short tables
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        ax2 = ax.twinx()
        # Draw the accuracy axis (and its annotation) above the compute axis.
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax2.plot(x, [p.relative_compute for p in pts], marker=marker and "s", ms=3,
                 color="tab:orange", label="compute (relative to large)")
        ax2.set_ylabel("compute relative to large model", color="tab:orange")
        ax2.set_ylim(bottom=0)

        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="large model accuracy")
        acc_line, = ax.plot(x, rel, marker=marker, ms=3, color="tab:blue",
                            label="accuracy (relative to large)")
        ax.plot(chosen.exit_rate, chosen.relative_accuracy, "*", ms=14, color="tab:red",
                label=f"chosen threshold {chosen.threshold:.4g}")
        # Put the label toward the emptier side: left of late points, below high ones.
        low, high = min(rel + [1.0]), max(rel + [1.0])
        dx = -15 if chosen.exit_rate > 0.5 else 15
        dy = -35 if chosen.relative_accuracy > (low + high) / 2 else 25
        ax.annotate(
            f"threshold {chosen.threshold:.4g}\nexit {chosen.exit_rate:.0%}, "
            f"accuracy {chosen.relative_accuracy:.3f}x",
            (chosen.exit_rate, chosen.relative_accuracy), textcoords="offset points",
            xytext=(dx, dy), ha="right" if dx < 0 else "left", va="center", fontsize=9,
            bbox={"boxstyle": "round", "fc": "white", "ec": "tab:red", "alpha": 0.9},
            arrowprops={"arrowstyle": "-", "color": "tab:red", "lw": 0.8},
        )
        ax.set_xlabel("exit rate (fraction answered by the small model)")
        ax.set_ylabel("accuracy relative to large model", color=acc_line.get_color())
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)

        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
        if title:
            ax.set_title(title)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_eval(result: dict, path, title: str = "") -> None:
    """Accuracy against retain, one line per guide; the small and large models alone as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    by_guide: dict[str, list[tuple[float, float]]] = {}
    for r in result["results"]:
        if r["accuracy"] is not None:
            by_guide.setdefault(r["guide"], []).append((r["retain"], r["accuracy"]))
    for guide, pts in by_guide.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=guide)
    for name, style in (("large_alone", "-"), ("small_alone", "--")):
        acc = (result.get(name) or {}).get("accuracy")
        if acc is not None:
            ax.axhline(acc, color="grey", linestyle=style, linewidth=1, label=name.replace("_", " "))
    ax.set_xscale("log")
    retains = sorted({r["retain"] for r in result["results"]})
    ax.set_xticks(retains, [f"{r:g}" for r in retains])
    ax.minorticks_off()
    ax.set_xlabel("retain (fraction of visual tokens the large model keeps)")
    ax.set_ylabel(f"accuracy ({result['metric']})")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or f"{result['items']} items", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
