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
import statistics
import time
from typing import Callable

import torch

from ..backends.base import LargeBackend, SmallModel
from ..pipeline.engine import Engine
from ..guides.base import n_keep, top_k_in_order
from .bench_figures import (TARGETS, arithmetic, check_claims, compute_of, config_vision_macs, device_key,  # noqa: F401
                            dtype_of, forced_threshold, in_process, lm_macs, matmul_peak, peak_of, pruned_macs, ratios,
                            same_tower, stage_flops, targets, vision_macs)
from .profile import StagePeak, device_name


def pool_size(batch_sizes, repeats: int, n: int, warmup: bool = True) -> int:
    """The items `run_bench` needs to give every timed call items no engine has seen: per round (the warm-up one
    too) and batch size b, b for the stages and `n` for each pipeline (streaming, serial)."""
    return (repeats + (1 if warmup else 0)) * (sum(batch_sizes) + 2 * n * len(batch_sizes))


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
    computes = {"": (device_key(small.model.device), arithmetic(str(next(small.model.parameters()).dtype)), 1)}
    for name, m in larges.items():
        where = compute_of(m)
        computes[name] = None if where is None else (where[0], arithmetic(dtype_of(m)), where[1])
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
        vision_reference = next((x for x in local if same_tower(x, m)), None)
        sections[name] = _section(engine, m, ref_works, ref_kept, gens[name], timed_records[name], identical[name],
                                  batch_sizes, prune_layers, k_report,
                                  {(stage, b): v for (owner, stage, b), v in per_item.items() if owner in ("", name)},
                                  {(stage, b): v for (owner, stage, b), v in memory.items() if owner in ("", name)},
                                  vision_reference)
        sections[name]["same_weights"] = same_weights or name == next(iter(larges))
        for b in batch_sizes:
            sections[name]["batches"][str(b)]["pipeline_busy"] = _busy(timed_busy.get((name, b), []))
        sections[name]["engine_options"] = m.engine_options()
        sections[name]["matmul_peak"] = peak_of(computes[name], peaks)
    small_peak = peak_of(computes[""], peaks)
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


def _section(engine, m: LargeBackend, works, kept, gen, records, identical, batch_sizes, prune_layers, k_report,
             per_item, peaks, vision_reference) -> dict:
    """One large backend's figures: its device, FLOPs, batches (ms, items/s, ratios), targets, tokens generated.
    `works`, `kept`, `gen`: the reference items'; `records`: each batch size's last timed pipeline records (the
    first batch size's: the reference items'); `identical`: whether each batch size answered the reference items
    as the first did."""
    b0 = batch_sizes[0]
    stages = list(dict.fromkeys(stage for stage, _ in per_item))
    flops = stage_flops(engine, m, works, kept, gen, prune_layers, k_report, records[b0], vision_reference)
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
            "ratios": ratios(per_item, b, b0, prune_layers, flops,
                              sum(r["exit"] == "small" for r in recs) / len(recs)),
        }
    large = [r for r in base if r["exit"] == "large"]
    tokens = {stage: round(statistics.mean(len(t) for t in g.tokens), 3) for stage, g in gen.items()}
    # The pipeline's large answers (the EOS, which usage leaves out, counted as the large stages count it).
    tokens["pipeline"] = round(statistics.mean(
        r["usage"]["completion_tokens"] + (r["finish_reason"] == "stop") for r in large), 3) if large else None
    return {
        "device": device_name(m.model) if in_process(m) else m.device,
        "dtype": dtype_of(m),
        "large_quantize": m.spec.quantize,
        "vision_stage": in_process(m),
        "tokens_generated": tokens,
        "flops": flops,
        "batches": batches,
        "targets": targets(batches, batch_sizes, k_report),
        "pipeline_answers": [(r["answer"], r["exit"]) for r in base],
    }


def _cross(sections: dict, batch_sizes, prune_layers) -> dict:
    """Each other backend's items/s over the first's, per large stage and the pipeline, at each batch size; and
    whether their pipeline answers (and exits) agree item by item."""
    names = list(sections)
    first = sections[names[0]]
    stages = ["large", *(f"pruned_k{k}" for k in prune_layers), "pipeline", "pipeline_serial"]
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


