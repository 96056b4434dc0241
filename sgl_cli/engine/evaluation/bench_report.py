"""Side-by-side speed measurements of the engine's stages, interleaved in one run, reported as ratios.

Absolute times on shared machines are noise; ratios of stages measured alternately in the same process are not.
Each round runs every stage once at every batch size; every figure is the median over `repeats` rounds.

Stages at batch size b (one batch of the first b items, except the pipeline):
- `small`, `small_capture`: the small model's greedy answer without and with SGP's importance capture;
- `vision`: the large model's vision tower alone (pruning does not reduce it);
- `large`: the large model alone, every visual token (vision tower included);
- `pruned_k{K}`: the large model from the top `retain` of the visual tokens as the small model ranks them, dropped
  at layer K (the ranking is given: this is the large stage of the pipeline);
- `pipeline`: `Engine.process` on all the items in batches of b, with the exit threshold set so that the chosen
  fraction exits (random weights cannot decide; the rate is forced by choosing the threshold from the small
  pass's own exit scores).

FLOPs: `lm_macs` for the language models (method.md section 6), the vision towers counted by torch's FlopCounter
on one item; the predicted speed-ups are ratios of these, beside the measured ones.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from ..pipeline.engine import Engine
from ..core.generate import collate, greedy, rows_device
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


def run_bench(engine: Engine, items: list, *, batch_sizes=(1, 8, 32), repeats: int = 3, exit_rate: float | None = None,
              prune_layers=(0,), warmup: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Every stage at every batch size, interleaved; see the module docstring. `items` (at least the largest batch
    size) all go through the pipeline; the other stages run the first b of them."""
    s = engine.settings
    small, large = engine.small, engine.large
    if small is None:
        raise ValueError("sgl bench needs a small model (its guidance is what it measures)")
    n, top = len(items), max(batch_sizes)
    if n < top:
        raise ValueError(f"{n} items cannot fill a batch of {top}")
    works = engine.prepare(items)
    engine.small_pass(works)  # guidance, exit scores; also warms the small model up
    bad = [w.error for w in works if w.error]
    if bad:
        raise ValueError(f"benchmark items failed: {bad[0]}")
    threshold = s.threshold if exit_rate is None else forced_threshold([w.small.exit_score for w in works], exit_rate)
    kept = [top_k_in_order(w.small.importance, n_keep(len(w.small.importance), s.retain)) for w in works]
    limits = [s.max_new_tokens] * n

    def rows(m, ws):
        return m.family.rows(m.model, [w.encoded.small if m is small else w.encoded.large for w in ws])

    def generate(m, ws):
        return greedy(m.model, collate(rows(m, ws), m.pad_id, rows_device(m.model)), limits[:len(ws)], m.eos_ids,
                      m.pad_id)

    records: dict[int, list[dict]] = {}
    engines = {b: Engine(dataclasses.replace(s, batch_size=b, threshold=threshold), small, large) for b in batch_sizes}
    stages: dict[str, Callable[[int], object]] = {
        "small": lambda b: generate(small, works[:b]),
        "small_capture": lambda b: engine.small_answer([dataclasses.replace(w) for w in works[:b]]),
        "vision": lambda b: large.family.image_features(large.model, [w.encoded.large for w in works[:b]]),
        "large": lambda b: generate(large, works[:b]),
        **{f"pruned_k{k}": (lambda b, k=k: engine.generate_kept(works[:b], rows(large, works[:b]), kept[:b], k,
                                                                 limits[:b])) for k in prune_layers},
        "pipeline": lambda b: records.__setitem__(b, list(engines[b].run(items))),
    }
    times = {(name, b): [] for name in stages for b in batch_sizes}
    peaks: dict[tuple[str, int], float] = {}
    rounds = repeats + (1 if warmup else 0)
    with torch.inference_mode():
        for r in range(rounds):  # interleaved: each round measures every stage once at every batch size
            for b in batch_sizes:
                for name, fn in stages.items():
                    if progress:
                        progress(f"round {r + 1}/{rounds}: {name} at batch {b}")
                    with StagePeak(large.model) as peak:
                        t0 = time.perf_counter()
                        fn(b)
                        peak.synchronize()
                        elapsed = time.perf_counter() - t0
                    peaks[name, b] = max(peaks.get((name, b), 0.0), peak.mb)
                    if r >= rounds - repeats:  # the warm-up round is not timed
                        times[name, b].append(elapsed)
        gen_large = generate(large, works)
        gen_pruned = {k: engine.generate_kept(works, rows(large, works), kept, k, limits) for k in prune_layers}

    ms = {key: statistics.median(v) * 1000 for key, v in times.items()}
    per_item = {key: v / (n if key[0] == "pipeline" else key[1]) for key, v in ms.items()}
    k_report = s.prune_layer if s.prune_layer in prune_layers else prune_layers[0]
    flops = _flops(engine, works, kept, gen_large, gen_pruned, prune_layers, k_report, records[batch_sizes[0]])
    base = records[batch_sizes[0]]
    batches = {}
    for b in batch_sizes:
        recs = records[b]
        batches[str(b)] = {
            "ms_per_item": {name: round(per_item[name, b], 3) for name in stages},
            "items_per_s": {name: round(1000 / per_item[name, b], 4) for name in stages},
            "peak_memory_mb": {name: round(peaks[name, b], 1) for name in stages},
            "pipeline_stage_ms": {st: round(statistics.mean(r["ms"][st] for r in recs), 3)
                                  for st in ("small", "large")},
            "exit_rate": sum(r["exit"] == "small" for r in recs) / n,
            "identical_to_batch_1": [(r["answer"], r["exit"]) for r in recs]
                                    == [(r["answer"], r["exit"]) for r in base],
            "ratios": _ratios(per_item, b, batch_sizes[0], prune_layers, flops),
        }
    return {
        "device": device_name(large.model),
        "dtype": str(next(large.model.parameters()).dtype).removeprefix("torch."),
        "large_quantize": large.spec.quantize,
        "items": n,
        "batch_sizes": list(batch_sizes),
        "repeats": repeats,
        "visual_tokens": statistics.mean(w.encoded.n_visual for w in works),
        "prompt_tokens": statistics.mean(len(w.encoded.visual) for w in works),
        "retain": s.retain,
        "retained_tokens": statistics.mean(len(k) for k in kept),
        "prune_layers": list(prune_layers),
        "prune_layer": k_report,
        "max_new_tokens": s.max_new_tokens,
        "exit_rate_target": exit_rate,
        "threshold": threshold,
        "flops": flops,
        "batches": batches,
        "targets": _targets(batches, batch_sizes, k_report),
    }


def _flops(engine, works, kept, gen_large, gen_pruned, prune_layers, k0: int, records) -> dict:
    """Per-item multiply-adds (GMACs) of every stage, from the items and answers of this run; the pipeline's
    large stage prunes at layer `k0`."""
    small, large = engine.small, engine.large
    n = len(works)
    vis_s = statistics.mean(vision_macs(small, w.encoded.small) for w in works[:1])
    vis_l = statistics.mean(vision_macs(large, w.encoded.large) for w in works[:1])  # same size: one item tells
    lm_small = statistics.mean(lm_macs(small.model, len(w.encoded.visual), len(w.small.tokens)) for w in works)
    c = n_keep(works[0].encoded.n_visual, engine.settings.consistency_retain)
    reread = statistics.mean(lm_macs(small.model, len(w.encoded.visual) - w.encoded.n_visual + c + len(w.small.tokens)
                                     - 1, 0) for w in works)
    lm_large = statistics.mean(lm_macs(large.model, len(w.encoded.visual), len(t))
                               for w, t in zip(works, gen_large.tokens))
    lm_pruned = {k: statistics.mean(
        pruned_macs(large.model, len(w.encoded.visual), len(w.encoded.visual) - w.encoded.n_visual + len(idx),
                    len(t), k)
        for w, idx, t in zip(works, kept, gen_pruned[k].tokens)) for k in prune_layers}
    exit_rate = sum(r["exit"] == "small" for r in records) / n
    g = 1e9
    out = {"vision_small": vis_s / g, "vision_large": vis_l / g, "lm_small": lm_small / g, "reread": reread / g,
           "lm_large": lm_large / g, "large": (vis_l + lm_large) / g}
    for k in prune_layers:
        out[f"lm_pruned_k{k}"] = lm_pruned[k] / g
        out[f"pruned_k{k}"] = (vis_l + lm_pruned[k]) / g
    out["pipeline"] = (vis_s + lm_small + reread) / g + (1 - exit_rate) * out[f"pruned_k{k0}"]
    return {key: round(v, 6) for key, v in out.items()}


def _ratios(per_item: dict, b: int, b0: int, prune_layers, flops: dict) -> dict:
    """Measured speed-ups at batch b beside those the FLOPs predict."""
    t = {name: v for (name, bb), v in per_item.items() if bb == b}
    out = {"capture_overhead": t["small_capture"] / t["small"],
           "pipeline_speedup": t["large"] / t["pipeline"],
           "pipeline_speedup_flops": flops["large"] / flops["pipeline"],
           "batch_speedup": per_item["pipeline", b0] / t["pipeline"]}
    for k in prune_layers:
        lm_full, lm_pruned = t["large"] - t["vision"], t[f"pruned_k{k}"] - t["vision"]
        out[f"large_stage_speedup_k{k}"] = t["large"] / t[f"pruned_k{k}"]
        out[f"large_stage_speedup_k{k}_flops"] = flops["large"] / flops[f"pruned_k{k}"]
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
