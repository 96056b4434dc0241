"""`sgl bench`: stage timings measured side by side in one run, reported as ratios."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import data_stdout, domain_errors, err, set_threads, with_help
from .options import LargeOptionOption


def bench(
    arch: Optional[str] = typer.Option(None, "--arch", help="A random-weight pair at a published architecture, built "
                                       "offline: qwen2.5-vl-3b-7b, qwen2.5-vl-7b-72b, llava-onevision-0.5b-7b, "
                                       "internvl3-1b-8b."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset to measure (real checkpoints)."),
    size: str = typer.Option("realistic", help="Built-in random pair when neither --arch nor --preset: realistic "
                             "(large LM 1024x8, 1,024 visual tokens), random (the default pair's size), tiny."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="--arch: cut both language models to this "
                                         "many layers (CPU runs and tests)."),
    vision_layers: Optional[int] = typer.Option(None, "--vision-layers", min=1, help="--arch: cut both vision towers "
                                                "to this many blocks."),
    dtype: str = typer.Option("auto", help="--arch: weight dtype: bfloat16, float16, float32 (auto: bfloat16 on a "
                              "GPU; float32 on a CPU, where torch's bfloat16 output head is pathologically slow)."),
    device: str = typer.Option("auto", help="--arch: where the weights are created (auto: the first GPU, else cpu)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="--arch: the large model's weights in 4bit (NF4, "
                                           "bitsandbytes) or 8bit."),
    visual_tokens: Optional[int] = typer.Option(None, "--visual-tokens", help="--arch: images sized to give exactly "
                                                "this many visual tokens (Qwen2.5-VL, InternVL3)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Image size in px: N (square) or WxH "
                                             "(default: 896, or the random pair's largest)."),
    input: Optional[Path] = typer.Option(None, "--input", help="JSONL items to time (default: generated images). "
                                         "Every timed call takes items not timed before: the file must hold that "
                                         "many (the error says how many)."),
    items: Optional[int] = typer.Option(None, "--items", min=1, help="Items through the pipeline per call (default: "
                                        "the largest batch size)."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Batch sizes, comma-separated."),
    retain: float = typer.Option(0.09, help="Retain ratio of the pruned large stage."),
    prune_layer: int = typer.Option(0, help="Prune layer K; the pruned stage is measured at K = 0 and at K."),
    exit_rate: Optional[float] = typer.Option(None, "--exit-rate", min=0.0, max=1.0, help="Force this fraction of "
                                              "items to exit early in the pipeline (default: 0.5 with random "
                                              "weights, else --threshold decides)."),
    threshold: Optional[float] = typer.Option(0.9, help="Early-exit threshold of the pipeline without --exit-rate."),
    max_new_tokens: int = typer.Option(8, help="Tokens generated per item."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds (after one untimed warm-up); medians are reported."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Also profile the batch-8 (or largest) pipeline "
                                           "once: top CPU and CUDA ops, GPU idle time, into this folder."),
    profile_trace: bool = typer.Option(False, "--profile-trace", help="With --profile: also the full Chrome trace."),
    large_backend: Optional[str] = typer.Option(
        None, "--large-backend", help="What runs the large model: transformers (default; with --preset, the "
        "preset's own), vllm (vLLM's engine: scripts/vllm_env.sh on a CPU, the vllm extra on a GPU), or a comma list "
        "measured side by side in the same rounds, the small model's stages shared: transformers,vllm.",
        show_default=False),
    large_option: LargeOptionOption = None,
    vllm: Optional[str] = typer.Option(None, "--vllm", help="The vllm backend's options, KEY=VALUE comma-separated "
                                       "(as --large-option: tensor_parallel_size, gpu_memory_utilization, "
                                       "max_model_len, max_num_seqs, enforce_eager, dtype, seed, "
                                       "enable_prefix_caching). Defaults: max_num_seqs the largest batch size, "
                                       "enable_prefix_caching=false; on a CPU also gpu_memory_utilization=0.2, "
                                       "enforce_eager=true.", show_default=False),
    threads: Optional[int] = typer.Option(None, help="Torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print every figure as one JSON object."),
) -> None:
    """Measure the large model alone, pruned (K = 0 and K), and the full pipeline, interleaved, at each batch size.

    Reports ms and items/s per stage, peak memory per stage, capture overhead, and measured speed-ups beside those
    the FLOPs predict, with the targets of a GPU run, and the options each engine ran with. Random weights cannot
    decide an early exit, so the pipeline's exit rate is forced (--exit-rate). --arch builds the pair at the
    published sizes with its weights directly on the device; on a CPU use --layers 2 --vision-layers 4 (and a
    small --image-size).

    No cache serves a timed call: every round and batch size takes items no engine has seen (generated, or the
    next ones of --input), and vLLM's prefix caching is off unless --vllm enable_prefix_caching=true. A stage that
    claims more multiply-adds per second than the device's matmul peak, measured in the same run, is an error.

    --large-backend transformers,vllm times each backend's large stages (large, pruned, pipeline) in the same
    rounds, on the same weights (the built-in pair's folder, the preset's checkpoints; with --arch vLLM makes random
    weights of its own, so the timings compare, the answers do not), and reports vLLM's items/s over transformers'.
    The vision stage and the LM-only speed-ups need the tower timed alone: transformers only. On a CPU, vLLM's own
    VLLM_CPU_KVCACHE_SPACE (GiB) sizes its KV cache.

    Examples:

      sgl bench --arch qwen2.5-vl-3b-7b --visual-tokens 2048 --exit-rate 0.5 --json > h200.json
      sgl bench --arch qwen2.5-vl-3b-7b --layers 2 --vision-layers 4 --image-size 224 --batch-sizes 1,4
      sgl bench --size realistic --batch-sizes 1,4 --repeats 2
      sgl bench --size realistic --large-backend transformers,vllm --items 16 --batch-sizes 1,16 --repeats 2
    """
    with domain_errors():
        from ..engine.errors import SglError
        from ..engine.evaluation.bench import Bench, parse_options, parse_sizes
        from ..engine.preset import parse_options as parse_pairs

        set_threads(threads)
        sizes = parse_sizes(batch_sizes, "--batch-sizes")
        setup = Bench(arch=arch, preset=preset, size=size, layers=layers, vision_layers=vision_layers, dtype=dtype,
                      device=device, quantize=quantize, visual_tokens=visual_tokens, image_size=image_size,
                      retain=retain, prune_layer=prune_layer, threshold=threshold, max_new_tokens=max_new_tokens,
                      large_backend=large_backend, options=parse_pairs(large_option, "--large-option"),
                      backend_options={} if vllm is None else {"vllm": parse_options(vllm)})
        # vLLM logs to stdout, in this process and in the engine processes it starts: while the models load and
        # run, whatever libraries print goes to stderr, so that stdout is the report alone.
        with data_stdout():
            try:
                engine, bench_items = setup.load(input, items or max(sizes), max_batch=max(sizes))
                result = setup.run(engine, bench_items, batch_sizes=sizes, repeats=repeats, exit_rate=exit_rate,
                                   profile=profile, profile_trace=profile_trace)
            except SglError:
                raise
            except ValueError as exc:
                raise SglError(str(exc)) from None
            finally:
                setup.close()
        if as_json:
            typer.echo(json.dumps(result, indent=1))
        else:
            from ..engine.views.tables import bench_tables

            bench_tables(result)
            err("")


with_help(bench)
