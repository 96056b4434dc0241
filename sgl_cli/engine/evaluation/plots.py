"""Plots (PNG, matplotlib on the Agg backend, imported lazily): a calibration's operating points, accuracy
against retain."""

from __future__ import annotations

from pathlib import Path

from .operating_points import Choice


def plot_calibration(choice: Choice, path: str | Path, *, title: str = "") -> None:
    """Relative accuracy against relative compute, one curve per retain over its thresholds (more exits: to the
    left), the accuracy target as a line, the chosen point marked, as a PNG."""
    import matplotlib  # lazy: keeps the CLI's import fast

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_retain: dict[float, list] = {}
    for p in choice.points:
        by_retain.setdefault(p.retain, []).append(p)
    chosen = choice.point
    lower = chosen.relative_accuracy_lower is not None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    try:
        colors = plt.get_cmap("viridis")
        for i, (retain, pts) in enumerate(sorted(by_retain.items(), reverse=True)):
            pts = sorted(pts, key=lambda p: p.relative_compute)
            color = colors(i / max(1, len(by_retain) - 1) * 0.9)
            ax.plot([p.relative_compute for p in pts], [p.relative_accuracy for p in pts], color=color, lw=1.3,
                    marker="o" if len(pts) <= 40 else "", ms=3, label=f"retain {retain:g}")
            if lower:
                ax.plot([p.relative_compute for p in pts], [p.relative_accuracy_lower for p in pts], color=color,
                        lw=0.8, ls=":")
        target = choice.target.get("target_accuracy")
        if target is not None:
            what = f"lower bound at {choice.target['confidence']:g}" if lower else "target"
            ax.axhline(target, color="tab:red", lw=0.9, ls="--", label=f"{what} {target:g} x large")
        ax.plot(1.0, 1.0, "s", color="black", ms=6, label="large model alone")
        ax.plot(chosen.relative_compute, chosen.relative_accuracy, "*", ms=16, color="tab:red", zorder=5,
                label="chosen")
        note = f"\nlower bound {chosen.relative_accuracy_lower:.3f}x" if lower else ""
        ax.annotate(
            f"retain {chosen.retain:g}, threshold {chosen.threshold:.4g}\nexit {chosen.exit_rate:.0%}, accuracy "
            f"{chosen.relative_accuracy:.3f}x{note}\ncompute {chosen.relative_compute:.2f}x",
            (chosen.relative_compute, chosen.relative_accuracy), textcoords="offset points", xytext=(25, -45),
            ha="left", va="center", fontsize=8.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "tab:red", "alpha": 0.9},
            arrowprops={"arrowstyle": "-", "color": "tab:red", "lw": 0.8},
        )
        ax.set_xlabel("compute relative to the large model alone (measured stage times)")
        ax.set_ylabel("accuracy relative to the large model alone")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
        if title:
            ax.set_title(title, fontsize=10)
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
