"""The tables `sgl eval` (stdout: accuracy per setting, the calibrated operating point checked) and `sgl calibrate`
(stderr: the best threshold per retain) print."""

from __future__ import annotations


def eval_table(result: dict) -> None:
    """The result as a table on stdout, one row per setting beside the models alone."""
    from rich.console import Console
    from rich.table import Table

    types = sorted({t for r in [result["large_alone"], *result["results"]] for t in r["per_type"]})
    large_acc = result["large_alone"]["accuracy"]
    exit_note = f", threshold {result['threshold']:.4g}" if result["threshold"] is not None else ", no early exit"
    table = Table(title=f"{result['items']} items, metric {result['metric']}{exit_note}", title_justify="left",
                  caption="rel: accuracy / large alone's; kept: mean visual tokens the large model kept",
                  caption_justify="left")
    for name in ("setting", "retain", "K", "accuracy", "rel", *types, "exit", "compute", "large calls", "kept",
                 "items/s"):
        table.add_column(name, justify="left" if name == "setting" else "right")

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def row(name, r, retain="1", k="", rel=None, exit_rate=None, kept=None, compute=None, style=None):
        table.add_row(name, retain, k, fmt(r["accuracy"]), fmt(rel), *(fmt(r["per_type"].get(t)) for t in types),
                      fmt(exit_rate, ".1%"), fmt(compute, ".2f"), str(r["large_calls"]), fmt(kept, ".1f"),
                      fmt(r["items_per_s"], ".2f"), style=style)

    if result["small_alone"]:
        s = result["small_alone"]
        row("small alone", s, rel=s["accuracy"] / large_acc if large_acc else None, style="dim")
    la = result["large_alone"]
    row("large alone", la, rel=1.0 if large_acc else None, kept=la["visual_tokens"], compute=1.0, style="bold")
    for r in result["results"]:
        row(r["guide"], r, retain=f"{r['retain']:g}", k=str(r["prune_layer"]), rel=r["relative_accuracy"],
            exit_rate=r["exit_rate"], kept=r["retained_tokens"], compute=r["relative_compute"])
    import sys

    # Piped or redirected, rich would wrap at 80 columns; a table in a file should stay one row per line.
    Console(width=None if sys.stdout.isatty() else 110 + 8 * len(types)).print(table)


def calibration_check_table(check: dict) -> None:
    """The calibrated operating point: predicted by its file, measured on these items."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"calibrated operating point ({check['file']}): sgl, retain {check['retain']:g}, prune layer "
                        f"{check['prune_layer']}, threshold {check['threshold']:.6g}", title_justify="left",
                  caption="x large: accuracy / the large model alone's; compute: 1 = the large model alone",
                  caption_justify="left")
    for name in ("", "items", "exit rate", "accuracy", "x large", "compute"):
        table.add_column(name, justify="left" if not name else "right")

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for name, values, n in (("predicted (its items)", check["predicted"], check["predicted_items"]),
                            ("measured (these items)", check["measured"], check["measured_items"])):
        values = values or {}
        table.add_row(name, str(n), fmt(values.get("exit_rate"), ".1%"), fmt(values.get("accuracy"), ".3f"),
                      fmt(values.get("relative_accuracy"), ".3f"), fmt(values.get("relative_compute"), ".2f"))
    Console(width=120).print(table)


def calibration_table(choice, costs, tty: bool) -> None:
    """`sgl calibrate`'s table on stderr: per retain, its best point for the target (the chosen one marked)."""
    from rich.console import Console
    from rich.table import Table

    lower = choice.point.relative_accuracy_lower is not None
    table = Table(title="best threshold per retain", title_justify="left",
                  caption="x large: accuracy / the large model alone's; compute (1: the large model alone on every "
                          "item) = small model + (1 - exit rate) x large at retain, each measured relative to the "
                          "large model alone", caption_justify="left")
    names = ["", "retain", "threshold", "exit rate", "accuracy", "x large", *(["lower"] if lower else []),
             "compute", "large at retain"]
    for name in names:
        table.add_column(name, justify="right")
    for retain, p in choice.best.items():
        mark = p == choice.point
        # The exit-nothing threshold is a hair above the top score: printed, the two would look equal.
        threshold = f"{p.threshold:.6g}" if p.n_exit else "above all"
        table.add_row("chosen" if mark else "", f"{retain:g}", threshold, f"{p.exit_rate:.1%}", f"{p.accuracy:.3f}",
                      f"{p.relative_accuracy:.3f}", *([f"{p.relative_accuracy_lower:.3f}"] if lower else []),
                      f"{p.relative_compute:.2f}", f"{costs.at(retain):.2f}", style="bold" if mark else None)
    # Redirected, rich would wrap at 80 columns; a table in a log should stay one row per line.
    Console(stderr=True, width=None if tty else 120).print(table)
