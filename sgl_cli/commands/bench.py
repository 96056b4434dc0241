"""`sgl bench`: stage timings measured side by side in one run, reported as ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import domain_errors, err, set_threads, with_help


def bench(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset to measure (default: a random pair built offline at --size)."),
    size: str = typer.Option("realistic", help="Built-in random pair when no --preset: realistic (large LM 1024x8, 1,024 visual tokens), random (the default pair's size), tiny."),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL items to time (default: --items generated shapes images)."),
    items: int = typer.Option(4, "--items", min=1, help="Generated items."),
    image_size: Optional[int] = typer.Option(None, help="Generated image side in px (default: the pair's largest)."),
    retain: float = typer.Option(0.09, help="Retain ratio of the pruned large stage."),
    prune_layer: int = typer.Option(0, help="Prune layer of the pruned large stage."),
    threshold: Optional[float] = typer.Option(0.9, help="Early-exit threshold of the full pipeline."),
    max_new_tokens: int = typer.Option(8, help="Tokens generated per item."),
    repeats: int = typer.Option(3, min=1, help="Interleaved rounds; medians are reported."),
    batch_size: int = typer.Option(4, help="Batch size compared with batch size 1."),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
) -> None:
    """Measure the large model alone, pruned, and the full pipeline, interleaved; print ratios.

    Reports items/s of each, capture overhead (small-model generation with importance capture vs without),
    the pruned large stage's speed-up against what its FLOPs predict (large_vs_floor: 1.0 is the floor),
    batch speed-up and peak memory.
    """
    with domain_errors():
        import tempfile

        from ..engine.builtin.shapes import write_items
        from ..engine.errors import SglError
        from ..engine.io.items import read_items
        from ..engine.preset import ModelSpec, Settings, load_preset

        set_threads(threads)
        settings = Settings(retain=retain, prune_layer=prune_layer, threshold=threshold,
                            max_new_tokens=max_new_tokens, prompt_suffix="Answer with one word.")
        settings.validate("command line")
        from ..engine.core.engine import Engine
        from ..engine.core.models import load_model

        if preset:
            p = load_preset(preset)
            small, large = load_model(p.small, "small"), load_model(p.large, "large")
            px = image_size or 896
        else:
            from ..engine.builtin.pair import SPECS, build_pair
            from ..engine.evaluation import bench as bench_mod

            specs = {"realistic": bench_mod.REALISTIC_SPEC, **SPECS}
            if size not in specs:
                raise SglError(f"unknown --size {size!r}; one of {', '.join(specs)}")
            spec = specs[size]
            tmp = Path(tempfile.mkdtemp(prefix="sgl-bench-"))
            pair = build_pair(spec, tmp)
            small = load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small")
            large = load_model(ModelSpec(str(pair["large"]), dtype="float32"), "large")
            px = image_size or int(spec.max_pixels ** 0.5)
        if input is None:
            folder = Path(tempfile.mkdtemp(prefix="sgl-bench-items-"))
            input = write_items(folder, items, seed=0, side=px)
        engine = Engine(settings, small, large)
        from ..engine.evaluation.bench import run_bench

        result = run_bench(engine, list(read_items(input)), repeats=repeats, batch_sizes=(1, batch_size))
        if as_json:
            typer.echo(json.dumps(result, indent=1))
        else:
            _table(result)


with_help(bench)


def _table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"sgl bench on {r['device']}: {r['items']} items, {r['visual_tokens']:.0f} visual tokens, "
                    f"retain {r['retain']} (kept {r['retained_tokens']:.0f}), prune layer {r['prune_layer']}")
    t.add_column("stage")
    t.add_column("ms / item", justify="right")
    t.add_column("items/s", justify="right")
    for name, ms in r["ms_per_item"].items():
        t.add_row(name, f"{ms:.1f}", f"{1000 / ms:.2f}")
    Console().print(t)
    ratios = Table(title="ratios (measured side by side)")
    ratios.add_column("figure")
    ratios.add_column("value", justify="right")
    ratios.add_column("meaning")
    ratios.add_row("capture_overhead", f"{r['capture_overhead']:.3f}", "small generation with / without capture")
    ratios.add_row("speedup_large_stage", f"{r['speedup_large_stage']:.2f}x", "large full / large pruned")
    ratios.add_row("speedup_large_lm", f"{r['speedup_large_lm']:.2f}x", "the same, language model only (vision excluded)")
    ratios.add_row("flops_speedup_large_stage", f"{r['flops_speedup_large_stage']:.2f}x", "the same predicted from FLOPs")
    ratios.add_row("large_vs_floor", f"{r['large_vs_floor']:.3f}", "pruned LM time / FLOPs-predicted (1 = floor)")
    for k, v in r["batch_speedup"].items():
        ratios.add_row(f"batch {k}", f"{v:.2f}x", "sgl pipeline items/s, batch b vs 1")
    ratios.add_row("exit_rate", f"{r['exit_rate']:.2f}", "items answered by the small model")
    ratios.add_row("peak_memory_mb", f"{r['peak_memory_mb']:.0f}", "process peak (RSS on CPU)")
    Console().print(ratios)
    err("")
