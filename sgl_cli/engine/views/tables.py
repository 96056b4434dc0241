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


def bench_tables(r: dict) -> None:
    """`sgl bench`'s report as tables on stdout: each stage's ms, items/s and peak memory per batch size and
    backend; the measured speed-ups beside the FLOPs'; the streaming pipeline's figures; backends side by side; the
    targets."""
    from rich.console import Console
    from rich.table import Table

    what = r.get("arch") or r.get("size") or "preset"
    console = Console()
    sections = r.get("backends") or {"transformers": r}
    names = list(sections)
    quantized = f", large {r['large_quantize']}" if r["large_quantize"] else ""
    where = ", ".join(f"{name} on {x['device']} ({x['dtype']})" for name, x in sections.items())
    t = Table(title=f"sgl bench {what}: {where}{quantized}: {r['visual_tokens']:.0f} visual tokens, retain "
                    f"{r['retain']} (kept {r['retained_tokens']:.0f}), exit rate {r['exit_rate_target']}")
    for c in ("batch", "stage", "backend", "ms / item", "items/s", "GMAC/s", "peak MiB"):
        t.add_column(c, justify="left" if c in ("stage", "backend") else "right")
    for b in map(str, r["batch_sizes"]):
        rows = []
        for stage in ("small", "small_capture"):  # the small model's: shared by every backend
            rows.append((stage, "(small)", sections[names[0]]["batches"][b], stage))
        stages = dict.fromkeys(st for x in sections.values() for st in x["batches"][b]["ms_per_item"]
                               if st not in ("small", "small_capture"))
        for stage in stages:
            for name in names:
                row = sections[name]["batches"][b]
                if stage in row["ms_per_item"]:
                    rows.append((stage, name, row, stage))
        for i, (stage, name, row, key) in enumerate(rows):
            peak = row["peak_memory_mb"].get(key)
            gmac = row["gmac_per_s"].get(key)
            t.add_row(b if i == 0 else "", stage, name, f"{row['ms_per_item'][key]:.1f}",
                      f"{row['items_per_s'][key]:.2f}", "-" if gmac is None else f"{gmac:.1f}",
                      "-" if peak is None else f"{peak:.0f}", end_section=i == len(rows) - 1)
    # What each engine ran with (vLLM's prefix caching among them), and the matmul peaks the stages stayed under.
    lines = [f"{name} engine: " + ", ".join(f"{k} {v}" for k, v in options.items() if v is not None)
             for name, options in r["engine_options"].items()]
    lines.append("matmul peaks measured in this run (GMAC/s): " + ", ".join(
        f"{name} not known (its device is not said: not checked)" if x is None else
        f"{name} {x['gmac_per_s']:.1f} ({x['device']}{' x' + str(x['parallel']) if x['parallel'] > 1 else ''}, "
        f"{x['dtype']})" for name, x in r["matmul_peaks"].items()))
    lines.append(f"every timed call on items no engine had seen: {r['fresh_items']} items in all")
    for line in lines:  # whole lines, as they are (no wrapping, no markup)
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    console.print(t)
    ratios = Table(title="measured speed-ups, FLOPs-predicted in brackets (LM only: where the tower is timed alone)")
    ratios.add_column("batch")
    ratios.add_column("backend", no_wrap=True)
    k = r["prune_layer"]
    cols = [("large stage", f"large_stage_speedup_k{k}"), ("LM only", f"lm_speedup_k{k}"),
            ("pipeline", "pipeline_speedup"), ("capture overhead", "capture_overhead"),
            ("vs batch 1", "batch_speedup")]
    for name, _ in cols:
        ratios.add_column(name, justify="right")
    for b in map(str, r["batch_sizes"]):
        for i, name in enumerate(names):
            x = sections[name]["batches"][b]["ratios"]
            ratios.add_row(b if i == 0 else "", name, *(
                "-" if key not in x
                else f"{x[key]:.2f}" + (f" [{x[key + '_flops']:.2f}]" if key + "_flops" in x else "")
                for _, key in cols), end_section=i == len(names) - 1)
    console.print(ratios)
    stream = Table(title="the streaming pipeline: over the serial one, over the pace of its slower stage alone "
                         "(overlap efficiency), each stage's busy share of its time, the small stage's MAC rate over "
                         "the large model alone's")
    for c in ("batch", "backend", "streaming / serial", "overlap efficiency", "small busy", "large busy",
              "most in flight", "small MAC rate"):
        stream.add_column(c, justify="left" if c == "backend" else "right")
    for b in map(str, r["batch_sizes"]):
        for i, name in enumerate(names):
            row = sections[name]["batches"][b]
            x, busy = row["ratios"], row.get("pipeline_busy") or {}
            stream.add_row(b if i == 0 else "", name, *(
                "-" if v is None else f"{v:.2f}" for v in (x.get("streaming_speedup"), x.get("overlap_efficiency"),
                                                           busy.get("small"), busy.get("large"))),
                str(busy.get("in_flight_max", "-")), "-" if x.get("small_mac_rate_ratio") is None
                else f"{x['small_mac_rate_ratio']:.2f}", end_section=i == len(names) - 1)
    console.print(stream)
    for pair, x in (r.get("cross_backend") or {}).items():
        other, _, first = pair.partition("_over_")
        cross = Table(title=f"{other} items/s over {first} items/s"
                            + ("" if sections[other]["same_weights"] else " (different weights: answers differ)"))
        cross.add_column("batch")
        stages = list(next(iter(x["items_per_s"].values())))
        for stage in stages:
            cross.add_column(stage, justify="right")
        for b, row in x["items_per_s"].items():
            cross.add_row(b, *(f"{row[stage]:.2f}x" for stage in stages))
        console.print(cross)
        n = len(sections[other]["pipeline_answers"])
        console.print(f"pipeline answers and exits on {other}: " + (
            f"the same as on {first}, all {n} items" if x["same_pipeline_answers"]
            else f"{x['pipeline_answers_differing']} of {n} items differ from those on {first}"))
    for name in names:
        tokens = sections[name].get("tokens_generated")
        if tokens:
            console.print(f"tokens generated per item on {name}: "
                          + ", ".join(f"{st} {v:.2f}" for st, v in tokens.items() if v is not None))
    targets = Table(title="the GPU run's targets (retain 0.09, K = 0, 2,048 visual tokens, batch 8)")
    for c in ("figure", "backend", "batch", "value", "target", "met"):
        targets.add_column(c)
    for name in names:
        for x in sections[name]["targets"]:
            targets.add_row(x["figure"], name, str(x["batch"]), f"{x['value']:.2f}", x["target"],
                            "yes" if x["met"] else "no")
    console.print(targets)
