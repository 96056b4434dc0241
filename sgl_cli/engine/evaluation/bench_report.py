"""Side-by-side speed measurements of the engine's stages, interleaved in one run, reported as ratios.

Absolute times on shared machines are noise; ratios of stages measured alternately in the same process are not.
Each round runs every stage once at every batch size; every figure is the median over `repeats` rounds.

No cache serves a timed call: each (round, batch size) takes new items from the pool, b for the stages and n for
the pipeline, which no engine has seen (vLLM's prefix cache and its encoder cache key on an image's content and
kept set; its processor cache is off in sgl). A stage that still claims more multiply-adds per second than its
device's matmul peak, measured in the same rounds, is refused (`check_claims`).

Stages at batch size b (one batch of b items, except the pipeline):
- `small`, `small_capture`: the small model's greedy answer without and with SGP's importance capture;
- `vision`: the large model's vision tower alone (pruning does not reduce it); only on a backend that holds the
  model in this process (transformers): vLLM runs its tower inside its own engine, where it cannot be timed alone;
- `large`: the large model alone, every visual token (vision tower included): the backend's `inputs` and
  `generate` with every visual token kept;
- `pruned_k{K}`: the same from the top `retain` of the visual tokens as the small model ranks them, dropped
  at layer K (the ranking is given: this is the large stage of the pipeline);
- `pipeline`: `Engine.process` on n items in batches of b, with the exit threshold set so that the chosen
  fraction of them exits (random weights cannot decide; the rate is forced by choosing the threshold from the small
  pass's own exit scores).

With several large backends (`larges`), each one's large stages and pipeline run in the same rounds, the small
model's stages once per round for all; each backend gets its own section of the report.

FLOPs: `lm_macs` for the language models (method.md section 6) from the models' configs, the vision towers counted
by torch's FlopCounter on one item; the predicted speed-ups are ratios of these, beside the measured ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
import types
from typing import Callable

import torch

from ..backends.base import LargeBackend, SmallModel
from ..backends.transformers import NOT_QUANTIZED
from ..errors import SglError
from ..pipeline.engine import Engine
from ..guides.base import n_keep, top_k_in_order
from .profile import StagePeak, device_name

# The targets (GPU, retain 0.09, K = 0, 2,048 visual tokens, batch 8): (figure, comparison, bound).
TARGETS = (("large_stage_speedup", ">=", 4.0), ("pipeline_speedup", ">=", 3.0), ("capture_overhead", "<=", 1.10),
           ("batch_speedup", ">=", 3.0))


def lm_macs(model, n_prompt: int, n_new: int) -> float:
    """Multiply-adds of one item's language-model pass (method.md section 6): prefill of n tokens, then
    n_new decode steps, per layer `n(2d^2 + 2 d d_kv) + n^2 d + 3ndm` (gated MLP) plus the LM head per step."""
    c = model.config.get_text_config()
    d, m, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    d_kv = d // c.num_attention_heads * c.num_key_value_heads
    per_token = 2 * d * d + 2 * d * d_kv + 3 * d * m
    prefill = layers * (n_prompt * per_token + n_prompt * n_prompt * d) + d * c.vocab_size
    decode = sum(layers * (per_token + 2 * (n_prompt + t) * d) + d * c.vocab_size for t in range(n_new))
    return float(prefill + decode)


def pruned_macs(model, n_full: int, n_kept: int, n_new: int, k: int) -> float:
    """`lm_macs` of a pass that drops tokens at layer k: layers < k on the full sequence, the rest on the kept."""
    layers = model.config.get_text_config().num_hidden_layers
    return (k * lm_macs(model, n_full, n_new) + (layers - k) * lm_macs(model, n_kept, n_new)) / layers


def vision_macs(m, enc: dict) -> float:
    """Multiply-adds of one item's vision tower and projector, as executed (torch's FlopCounter; its attention
    formula also for the CPU's SDPA kernel, which it does not list)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping={cpu_op: cpu_sdpa} if cpu_op else {}) \
            as counter:
        m.family.image_features(m.model, [enc])
    return counter.get_total_flops() / 2


def forced_threshold(scores: list[float], rate: float) -> float | None:
    """The exit threshold at which `round(rate * n)` of these exit scores exit: halfway between the last score
    that exits and the first that does not (None: none exits)."""
    ranked = sorted(scores, reverse=True)
    k = round(rate * len(ranked))
    if k == 0:
        return None
    if k == len(ranked):
        return ranked[-1]
    return (ranked[k - 1] + ranked[k]) / 2


def in_process(m: LargeBackend) -> bool:
    """Whether the large backend `m` holds a transformers model in this process (its vision tower can be timed
    alone, its memory sampled, its FLOPs counted as executed)."""
    return m.in_process


def pool_size(batch_sizes, repeats: int, n: int, warmup: bool = True) -> int:
    """The items `run_bench` needs to give every timed call items no engine has seen: per round (the warm-up one
    too) and batch size b, b for the stages and `n` for each pipeline (streaming, serial)."""
    return (repeats + (1 if warmup else 0)) * (sum(batch_sizes) + 2 * n * len(batch_sizes))


def matmul_peak(device: str, dtype: str) -> float:
    """The device's own measured matmul rate in `dtype`, multiply-adds per second: the fastest of three n x n
    products, n doubled from 256 until one takes 50 ms (at most 2,048 on a CPU, 8,192 on a GPU); on a CPU with
    every core this process may use (vLLM's worker may use them all, whatever torch's threads are here)."""
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    kind = getattr(torch, dtype)
    threads = torch.get_num_threads()

    def timed(a, b) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    if cpu:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        with torch.inference_mode():
            n = 256
            while True:
                a, b = (torch.randn(n, n, device=dev).to(kind) for _ in range(2))
                timed(a, b)  # untimed: allocation, kernel choice
                if timed(a, b) >= 0.05 or n >= (2048 if cpu else 8192):
                    break
                n *= 2
            best = min(timed(a, b) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return n ** 3 / best


def _compute(m: LargeBackend) -> tuple[str, int] | None:
    """(torch device, how many run in parallel) of a large backend's arithmetic: an in-process model's device; a
    backend's engine options' `device` and `tensor_parallel_size` (vLLM's, on this machine); None for a backend
    that does not say where it computes (a plugin's engine may be elsewhere, or be no model: echo)."""
    if in_process(m):
        return _device_key(m.model.device), 1
    options = m.engine_options()
    if not options.get("device"):
        return None
    return _device_key(options["device"]), int(options.get("tensor_parallel_size") or 1)


def _arithmetic(dtype: str | None) -> str:
    """The dtype a model's products run in: its weights' (a quantized model's first weights are its compute
    dtype's; anything else: float32)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _device_key(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def run_bench(engine: Engine, items: list, *, batch_sizes=(1, 8, 32), repeats: int = 3, exit_rate: float | None = None,
              prune_layers=(0,), warmup: bool = True, progress: Callable[[str], None] | None = None,
              larges: dict | None = None, same_weights: bool = True, pipeline_items: int | None = None) -> dict:
    """Every stage at every batch size, interleaved; see the module docstring. `items` is a pool of at least
    `pool_size` items, taken in order: every timed call gets items no engine has timed before, so that no cache
    (vLLM's prefix and encoder caches) can serve it; the pipeline runs `pipeline_items` (default: the largest
    batch size) per call, the other stages b. `larges` (name -> large backend, default: the engine's own) are
    measured side by side on the same items, the small model's stages shared; the report's top-level figures are
    the first backend's, `backends` has each one's, `cross_backend` their ratios to the first (`same_weights`:
    whether the backends' large models hold the same weights, so that their answers can agree). A stage that
    claims more multiply-adds per second than its device's matmul peak (the best measured beside each round's
    batch sizes) is refused (SglError): a cache served it, or its FLOPs are miscounted."""
    s = engine.settings
    small = engine.small
    larges = dict(larges) if larges else {engine.large.name: engine.large}
    if small is None:
        raise ValueError("sgl bench needs a small model (its guidance is what it measures)")
    top = max(batch_sizes)
    n = pipeline_items or top
    if n < top:
        raise ValueError(f"{n} items cannot fill a batch of {top}")
    rounds = repeats + (1 if warmup else 0)
    need = pool_size(batch_sizes, repeats, n, warmup)
    if len(items) < need:
        raise ValueError(
            f"{len(items)} items: every timed call takes items no engine has seen, {need} in all ({rounds} rounds x "
            f"({' + '.join(map(str, batch_sizes))} for the stages + {n} for each pipeline, streaming and serial, at "
            f"each of {len(batch_sizes)} batch sizes)); give more items, or fewer rounds, batch sizes or --items")
    pool = iter(items)
    limits = [s.max_new_tokens] * max(n, top)

    def analyzed(its: list) -> list:
        """The items prepared and through the small pass (untimed): guidance and exit scores."""
        works = engine.prepare(its)
        engine.small_pass(works)
        bad = [w.error for w in works if w.error]
        if bad:
            raise ValueError(f"benchmark items failed: {bad[0]}")
        return works

    def kept_of(works: list) -> list:
        return [top_k_in_order(w.small.importance, n_keep(len(w.small.importance), s.retain)) for w in works]

    def threshold_of(works: list) -> float | None:
        # Forced per set of items: each pipeline call exits the same fraction.
        return s.threshold if exit_rate is None else forced_threshold([w.small.exit_score for w in works], exit_rate)

    def small_generate(ws):
        return small.answer(ws, limits[:len(ws)], capture=False)

    def large_stage(m: LargeBackend, ws, idx, k):
        # Through the seam, as the pipeline runs it: the backend's inputs (on transformers: the vision tower), then
        # its answers from the given visual tokens.
        return m.generate(ws, m.inputs(ws, []), idx, k, limits[:len(ws)])

    def pipeline_engine(m, b: int, threshold, pipeline: str = "streaming"):
        return Engine(dataclasses.replace(s, batch_size=b, threshold=threshold, pipeline=pipeline), small, m)

    def streamed(name: str, b: int, run) -> None:
        timed_records[name][b] = list(run.run(pipe))
        busy.setdefault((name, b), []).append(run.last_stream.busy)

    # Peak memory is sampled in this process: for the small model's stages on the first in-process large model's
    # device (as the large one's stages), none for a backend whose engine runs in processes of its own.
    local = [m for m in larges.values() if in_process(m)]
    shared_model = local[0].model if local else small.model
    # Where each stage's arithmetic runs, for the matmul peak: (device, dtype, parallel count).
    computes = {"": (_device_key(small.model.device), _arithmetic(str(next(small.model.parameters()).dtype)), 1)}
    for name, m in larges.items():
        where = _compute(m)
        computes[name] = None if where is None else (where[0], _arithmetic(_dtype(m)), where[1])
    peaks = {(x[0], x[1]): 0.0 for x in computes.values() if x is not None}
    timed_records: dict[str, dict[int, list[dict]]] = {name: {} for name in larges}
    busy: dict[tuple[str, int], list] = {}  # each streaming pipeline's stage times (pipeline/stream.Busy)
    times: dict[tuple[str, str, int], list[float]] = {}
    memory: dict[tuple[str, str, int], float] = {}
    reference = None  # the last round's pipeline items at the first batch size: FLOPs, answers, batch identity
    with torch.inference_mode():
        for r in range(rounds):  # interleaved: each round measures every stage once at every batch size
            for b in batch_sizes:
                for key in peaks:  # beside every batch size's stages: the best the device did in the same run
                    peaks[key] = max(peaks[key], matmul_peak(*key))
                if progress:
                    progress(f"round {r + 1}/{rounds}: items for batch {b} through the small model (untimed)")
                works = analyzed([next(pool) for _ in range(b)])
                kept = kept_of(works)
                every = [torch.arange(w.encoded.n_visual) for w in works]  # the unpruned large stage keeps all
                pipe = [next(pool) for _ in range(n)]
                pipe_works = analyzed(pipe)
                threshold = threshold_of(pipe_works)
                serial = [next(pool) for _ in range(n)]  # the serial pipeline's own fresh items
                serial_threshold = threshold_of(analyzed(serial))
                if b == batch_sizes[0]:
                    reference = (pipe, pipe_works, threshold)
                plan: list[tuple[str, str, Callable[[], object], object]] = [
                    ("", "small", lambda: small_generate(works), shared_model),
                    ("", "small_capture", lambda: engine.small_answer([dataclasses.replace(w) for w in works]),
                     shared_model),
                    # the pipeline's small stage: the answer with the capture, then SEE's re-read
                    ("", "small_stage", lambda: engine.small_pass([dataclasses.replace(w) for w in works]),
                     shared_model)]
                for name, m in larges.items():
                    model = m.model if in_process(m) else None
                    if in_process(m):  # a backend whose tower runs elsewhere (vLLM) cannot time it alone
                        plan.append((name, "vision", lambda m=m: m.family.image_features(
                            m.model, [w.encoded.large for w in works]), model))
                    # The large and pruned stages share items: vLLM's caches key an image by its kept set too
                    # (sgl's plugin hashes it), so one cannot serve the other.
                    plan.append((name, "large", lambda m=m: large_stage(m, works, every, 0), model))
                    for k in prune_layers:
                        plan.append((name, f"pruned_k{k}", lambda m=m, k=k: large_stage(m, works, kept, k), model))
                    run = pipeline_engine(m, b, threshold)
                    plan.append((name, "pipeline", lambda name=name, b=b, run=run: streamed(name, b, run), model))
                    one_by_one = pipeline_engine(m, b, serial_threshold, "serial")
                    plan.append((name, "pipeline_serial", lambda run=one_by_one: list(run.run(serial)), model))
                for owner, stage, fn, model in plan:
                    if progress:
                        progress(f"round {r + 1}/{rounds}: {stage}{' on ' + owner if owner else ''} at batch {b}")
                    with (StagePeak(model) if model is not None else contextlib.nullcontext()) as peak:
                        t0 = time.perf_counter()
                        fn()
                        if peak is not None:
                            peak.synchronize()
                        elapsed = time.perf_counter() - t0
                    if peak is not None:
                        memory[owner, stage, b] = max(memory.get((owner, stage, b), 0.0), peak.mb)
                    if r >= rounds - repeats:  # the warm-up round is not timed
                        times.setdefault((owner, stage, b), []).append(elapsed)
        # Untimed, on the reference items (which the timed records at the first batch size answered): the large
        # stages' generations (tokens per item, for the FLOPs), and the pipeline at every other batch size, whose
        # records must equal those.
        ref_items, ref_works, ref_threshold = reference
        ref_kept = kept_of(ref_works)
        ref_every = [torch.arange(w.encoded.n_visual) for w in ref_works]
        gens = {name: {stage: large_stage(m, ref_works, idx, k) for stage, idx, k in
                       [("large", ref_every, 0)] + [(f"pruned_k{k}", ref_kept, k) for k in prune_layers]}
                for name, m in larges.items()}
        b0 = batch_sizes[0]
        identical = {}
        for name, m in larges.items():
            base = [(x["answer"], x["exit"]) for x in timed_records[name][b0]]
            identical[name] = {b: b == b0 or [(x["answer"], x["exit"]) for x in pipeline_engine(
                m, b, ref_threshold).run(ref_items)] == base for b in batch_sizes}

    ms = {key: statistics.median(v) * 1000 for key, v in times.items()}
    per_item = {key: v / (n if key[1].startswith("pipeline") else key[2]) for key, v in ms.items()}
    timed_busy = {key: v[-repeats:] for key, v in busy.items()}  # the warm-up round's aside
    k_report = s.prune_layer if s.prune_layer in prune_layers else prune_layers[0]
    sections = {}
    for name, m in larges.items():
        vision_reference = next((x for x in local if _same_tower(x, m)), None)
        sections[name] = _section(engine, m, ref_works, ref_kept, gens[name], timed_records[name], identical[name],
                                  batch_sizes, prune_layers, k_report,
                                  {(stage, b): v for (owner, stage, b), v in per_item.items() if owner in ("", name)},
                                  {(stage, b): v for (owner, stage, b), v in memory.items() if owner in ("", name)},
                                  vision_reference)
        sections[name]["same_weights"] = same_weights or name == next(iter(larges))
        for b in batch_sizes:
            sections[name]["batches"][str(b)]["pipeline_busy"] = _busy(timed_busy.get((name, b), []))
        sections[name]["engine_options"] = m.engine_options()
        sections[name]["matmul_peak"] = _peak_of(computes[name], peaks)
    small_peak = _peak_of(computes[""], peaks)
    for name, section in sections.items():
        check_claims(name, section, small_peak)
        for row in section["batches"].values():  # each stage's arithmetic rate beside the large model alone's
            rates = row["gmac_per_s"]
            if rates.get("large"):
                row["mac_rate_ratio"] = {stage: round(v / rates["large"], 4) for stage, v in rates.items()}
                if "small_stage" in rates:
                    row["ratios"]["small_mac_rate_ratio"] = row["mac_rate_ratio"]["small_stage"]
    first = next(iter(sections.values()))
    report = {
        "device": first["device"],
        "dtype": first["dtype"],
        "large_quantize": first["large_quantize"],
        "large_backends": list(larges),
        "items": n,
        "fresh_items": need,  # every timed call on items no engine had seen: this many in all
        "batch_sizes": list(batch_sizes),
        "repeats": repeats,
        "visual_tokens": statistics.mean(w.encoded.n_visual for w in ref_works),
        "prompt_tokens": statistics.mean(len(w.encoded.visual) for w in ref_works),
        "retain": s.retain,
        "retained_tokens": statistics.mean(len(k) for k in ref_kept),
        "prune_layers": list(prune_layers),
        "prune_layer": k_report,
        "max_new_tokens": s.max_new_tokens,
        "exit_rate_target": exit_rate,
        "threshold": ref_threshold,
        "flops": first["flops"],
        "batches": first["batches"],
        "targets": first["targets"],
        "engine_options": {"small": small_options(small),
                           **{name: x["engine_options"] for name, x in sections.items()}},
        "matmul_peaks": {"small": small_peak, **{name: x["matmul_peak"] for name, x in sections.items()}},
        "backends": sections,
    }
    if len(sections) > 1:
        report["cross_backend"] = _cross(sections, batch_sizes, prune_layers)
    return report


def _busy(runs: list) -> dict:
    """The streaming pipeline's stages' busy shares of its wall time, and the most items in the large stage at
    once: medians over the timed runs (pipeline/stream.Busy)."""
    if not runs:
        return {}
    shares = [x.shares() for x in runs]
    return {"small": round(statistics.median(x["small"] for x in shares), 4),
            "large": round(statistics.median(x["large"] for x in shares), 4),
            "in_flight_max": max(x.in_flight_max for x in runs)}


def small_options(small: SmallModel) -> dict:
    """The small model's engine options, as its backend says them."""
    return small.engine_options()


def _peak_of(compute: tuple[str, str, int] | None, peaks: dict) -> dict | None:
    if compute is None:  # where it computes is not known: its claims are not checked
        return None
    device, dtype, count = compute
    return {"device": device, "dtype": dtype, "parallel": count,
            "gmac_per_s": round(peaks[device, dtype] * count / 1e9, 3)}


# Each stage's multiply-adds per item (keys of a section's `flops`, summed), and whether its arithmetic runs on the
# small model's device, the large backend's, or both in turn (the pipeline: at most the faster one's peak).
STAGE_FLOPS = {"small": (("vision_small", "lm_small"), "small"),
               "small_capture": (("vision_small", "lm_small"), "small"),
               "small_stage": (("vision_small", "lm_small", "reread"), "small"),
               "vision": (("vision_large",), "large"), "large": (("large",), "large"),
               "pipeline": (("pipeline",), "both"), "pipeline_serial": (("pipeline",), "both")}


def check_claims(name: str, section: dict, small_peak: dict) -> None:
    """Refuse a section whose stage claims more multiply-adds per second than its device's measured matmul peak
    (a cache served it, or its FLOPs are miscounted): one line naming the backend, stage and batch size. Each
    batch row gets `gmac_per_s`, the claims that passed. A backend whose device is not known (`matmul_peak` None)
    has its own stages' claims stated, not checked."""
    flops = section["flops"]
    large_peak = section["matmul_peak"]
    for b, row in section["batches"].items():
        claims = {}
        for stage, ms in row["ms_per_item"].items():
            keys, where = STAGE_FLOPS.get(stage, ((stage,), "large"))
            if not all(k in flops for k in keys):
                continue
            gmac = sum(flops[k] for k in keys)
            claims[stage] = round(gmac * 1000 / ms, 3)
            if where == "small":
                peak = small_peak
            elif large_peak is None:
                continue
            else:
                peak = large_peak if where == "large" else max((small_peak, large_peak), key=lambda x: x["gmac_per_s"])
            if claims[stage] > peak["gmac_per_s"]:
                owner = "the small model" if where == "small" else name
                raise SglError(
                    f"{owner}'s {stage} stage at batch {b} claims {claims[stage]:.1f} GMAC/s ({gmac:.2f} GMAC per "
                    f"item in {ms:.1f} ms), above the {peak['dtype']} matmul peak measured on {peak['device']}"
                    + (f" x{peak['parallel']}" if peak["parallel"] > 1 else "") + f" in this run, "
                    f"{peak['gmac_per_s']:.1f} GMAC/s: a cache served it or its FLOPs are miscounted; not reported")
        row["gmac_per_s"] = claims


def _same_tower(a: LargeBackend, b: LargeBackend) -> bool:
    """Whether two large backends' configs give the same vision tower (so one's FLOPs count serves both)."""
    def tower(m):
        c = m.model.config.to_dict()
        return {k: v for k, v in c.items() if "vision" in k or k in ("image_token_id", "architectures")}

    skip = ("dtype", "torch_dtype", "_attn_implementation", "_name_or_path", "architectures")

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in skip}

    return a is b or clean(tower(a)) == clean(tower(b))


def _section(engine, m: LargeBackend, works, kept, gen, records, identical, batch_sizes, prune_layers, k_report, per_item, peaks,
             vision_reference) -> dict:
    """One large backend's figures: its device, FLOPs, batches (ms, items/s, ratios), targets, tokens generated.
    `works`, `kept`, `gen`: the reference items'; `records`: each batch size's last timed pipeline records (the
    first batch size's: the reference items'); `identical`: whether each batch size answered the reference items
    as the first did."""
    b0 = batch_sizes[0]
    stages = list(dict.fromkeys(stage for stage, _ in per_item))
    flops = _flops(engine, m, works, kept, gen, prune_layers, k_report, records[b0], vision_reference)
    base = records[b0]
    batches = {}
    for b in batch_sizes:
        recs = records[b]
        batches[str(b)] = {
            "ms_per_item": {name: round(per_item[name, b], 3) for name in stages},
            "items_per_s": {name: round(1000 / per_item[name, b], 4) for name in stages},
            # Absent for the stages of a backend whose engine runs in processes of its own (vLLM).
            "peak_memory_mb": {name: round(peaks[name, b], 1) for name in stages if (name, b) in peaks},
            "pipeline_stage_ms": {st: round(statistics.mean(r["ms"][st] for r in recs), 3)
                                  for st in ("small", "large")},
            "exit_rate": sum(r["exit"] == "small" for r in recs) / len(recs),
            "identical_to_batch_1": identical[b],
            "ratios": _ratios(per_item, b, b0, prune_layers, flops,
                              sum(r["exit"] == "small" for r in recs) / len(recs)),
        }
    large = [r for r in base if r["exit"] == "large"]
    tokens = {stage: round(statistics.mean(len(t) for t in g.tokens), 3) for stage, g in gen.items()}
    # The pipeline's large answers (the EOS, which usage leaves out, counted as the large stages count it).
    tokens["pipeline"] = round(statistics.mean(
        r["usage"]["completion_tokens"] + (r["finish_reason"] == "stop") for r in large), 3) if large else None
    return {
        "device": device_name(m.model) if in_process(m) else m.device,
        "dtype": _dtype(m),
        "large_quantize": m.spec.quantize,
        "vision_stage": in_process(m),
        "tokens_generated": tokens,
        "flops": flops,
        "batches": batches,
        "targets": _targets(batches, batch_sizes, k_report),
        "pipeline_answers": [(r["answer"], r["exit"]) for r in base],
    }


def _dtype(m: LargeBackend) -> str | None:
    """The dtype the large model's engine runs in (as it resolved "auto"), else the spec's."""
    return m.engine_options().get("dtype") or m.spec.dtype


def _cross(sections: dict, batch_sizes, prune_layers) -> dict:
    """Each other backend's items/s over the first's, per large stage and the pipeline, at each batch size; and
    whether their pipeline answers (and exits) agree item by item."""
    names = list(sections)
    first = sections[names[0]]
    stages = ["large", *(f"pruned_k{k}" for k in prune_layers), "pipeline"]
    out = {}
    for name in names[1:]:
        other = sections[name]
        ratios = {}
        for b in map(str, batch_sizes):
            mine, theirs = other["batches"][b]["items_per_s"], first["batches"][b]["items_per_s"]
            ratios[b] = {stage: round(mine[stage] / theirs[stage], 4) for stage in stages
                         if stage in mine and stage in theirs}
        same = [tuple(a) == tuple(x) for a, x in zip(other["pipeline_answers"], first["pipeline_answers"])]
        out[f"{name}_over_{names[0]}"] = {"items_per_s": ratios, "same_pipeline_answers": all(same),
                                          "pipeline_answers_differing": len(same) - sum(same)}
    return out


def _flops(engine, large: LargeBackend, works, kept, gen: dict, prune_layers, k0: int, records, vision_reference=None) -> dict:
    """Per-item multiply-adds (GMACs) of every stage, from the items and answers of this run (`gen`: the large
    stages' generations on every item); the pipeline's large stage prunes at layer `k0`. The language models'
    come from their configs; the large vision tower is counted as executed on an in-process backend (`large`, or
    `vision_reference`, one with the same tower), else on a copy built from the config (`config_vision_macs`)."""
    small = engine.small
    n = len(works)
    vis_s = statistics.mean(vision_macs(small, w.encoded.small) for w in works[:1])
    tower = large if in_process(large) else vision_reference
    # same size: one item tells
    vis_l = vision_macs(tower, works[0].encoded.large) if tower is not None else config_vision_macs(
        large, works[0].encoded.large)
    lm_small = statistics.mean(lm_macs(small.model, len(w.encoded.visual), len(w.small.tokens)) for w in works)
    c = n_keep(works[0].encoded.n_visual, engine.settings.consistency_retain)
    reread = statistics.mean(lm_macs(small.model, len(w.encoded.visual) - w.encoded.n_visual + c + len(w.small.tokens)
                                     - 1, 0) for w in works)
    lm_large = statistics.mean(lm_macs(large.model, len(w.encoded.visual), len(t))
                               for w, t in zip(works, gen["large"].tokens))
    lm_pruned = {k: statistics.mean(
        pruned_macs(large.model, len(w.encoded.visual), len(w.encoded.visual) - w.encoded.n_visual + len(idx),
                    len(t), k)
        for w, idx, t in zip(works, kept, gen[f"pruned_k{k}"].tokens)) for k in prune_layers}
    exit_rate = sum(r["exit"] == "small" for r in records) / n
    g = 1e9
    out = {"vision_small": vis_s / g, "vision_large": vis_l / g, "lm_small": lm_small / g, "reread": reread / g,
           "lm_large": lm_large / g, "large": (vis_l + lm_large) / g}
    for k in prune_layers:
        out[f"lm_pruned_k{k}"] = lm_pruned[k] / g
        out[f"pruned_k{k}"] = (vis_l + lm_pruned[k]) / g
    out["pipeline"] = (vis_s + lm_small + reread) / g + (1 - exit_rate) * out[f"pruned_k{k0}"]
    return {key: round(v, 6) for key, v in out.items()}


def config_vision_macs(m: LargeBackend, enc: dict) -> float:
    """`vision_macs` of a large backend that holds no transformers model (vLLM): its vision tower and projector
    built from its config on the CPU with zero weights (the count does not depend on them; the language model
    stays on the meta device), run once on `enc`."""
    import re

    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    tower = [re.compile(p) for p in NOT_QUANTIZED if p != "lm_head"]  # the tower and its projector
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(m.model.config)
    for name, module in model.named_modules():
        if any(p.match(name) for p in tower):
            for sub in module.modules():
                for pname, p in list(sub.named_parameters(recurse=False)):
                    if p.is_meta:
                        setattr(sub, pname, torch.nn.Parameter(torch.zeros(p.shape), requires_grad=False))
    return vision_macs(types.SimpleNamespace(model=model.eval(), family=m.family), enc)


def _ratios(per_item: dict, b: int, b0: int, prune_layers, flops: dict, exit_rate: float | None = None) -> dict:
    """Measured speed-ups at batch b beside those the FLOPs predict (the language model's alone where the vision
    tower was timed alone)."""
    t = {name: v for (name, bb), v in per_item.items() if bb == b}
    out = {"capture_overhead": t["small_capture"] / t["small"],
           "pipeline_speedup": t["large"] / t["pipeline"],
           "pipeline_speedup_flops": flops["large"] / flops["pipeline"],
           "batch_speedup": per_item["pipeline", b0] / t["pipeline"]}
    if "pipeline_serial" in t:
        out["streaming_speedup"] = t["pipeline_serial"] / t["pipeline"]
        out["serial_pipeline_speedup"] = t["large"] / t["pipeline_serial"]
    if "small_stage" in t and exit_rate is not None:
        # The slower stage alone sets the pace: every item through the small stage, the rest through the pruned
        # large one. Overlap efficiency: the pipeline's rate over that pace (1: perfectly overlapped).
        k0 = prune_layers[0]
        floor = max(t["small_stage"], (1 - exit_rate) * t[f"pruned_k{k0}"])
        out["overlap_efficiency"] = floor / t["pipeline"]
    for k in prune_layers:
        out[f"large_stage_speedup_k{k}"] = t["large"] / t[f"pruned_k{k}"]
        out[f"large_stage_speedup_k{k}_flops"] = flops["large"] / flops[f"pruned_k{k}"]
        if "vision" not in t:
            continue
        lm_full, lm_pruned = t["large"] - t["vision"], t[f"pruned_k{k}"] - t["vision"]
        out[f"lm_speedup_k{k}"] = lm_full / lm_pruned if lm_pruned > 0 else float("nan")
        out[f"lm_speedup_k{k}_flops"] = flops["lm_large"] / flops[f"lm_pruned_k{k}"]
        # The pruned LM's time over what the unpruned LM's time scaled by the FLOPs ratio predicts (1: the floor).
        out[f"lm_vs_floor_k{k}"] = out[f"lm_speedup_k{k}_flops"] / out[f"lm_speedup_k{k}"]
    return {key: round(v, 4) for key, v in out.items()}


def _targets(batches: dict, batch_sizes, k: int) -> list[dict]:
    """The issue's targets, read at batch 8 (or the nearest batch size measured)."""
    b = str(min(batch_sizes, key=lambda x: abs(x - 8)))
    ratios = batches[b]["ratios"]
    names = {"large_stage_speedup": f"large_stage_speedup_k{k}"}
    out = []
    for figure, op, bound in TARGETS:
        value = ratios[names.get(figure, figure)]
        out.append({"figure": figure, "batch": int(b), "value": value, "target": f"{op} {bound}",
                    "met": value >= bound if op == ">=" else value <= bound})
    return out
