"""Side-by-side speed measurements of the engine's stages, interleaved in one run, reported as ratios.

Absolute times on shared machines are noise; ratios of stages measured alternately in the same process are
not. Every figure is the median over `repeats` interleaved rounds.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Callable

import torch

from ..builtin.pair import LMSize, PairSpec
from ..core.engine import Engine
from ..core.generate import collate, greedy, rows_device
from ..guides.base import n_keep, top_k_in_order

# A pair big enough that CPU timings mean something: 896x896 images give 1,024 visual tokens.
REALISTIC_SPEC = PairSpec(
    small=LMSize(256, 4, 4, 2, 1024),
    large=LMSize(1024, 8, 16, 4, 4096),
    vision_embed=128,
    vision_depth=2,
    max_pixels=896 * 896,
)


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


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def run_bench(engine: Engine, items: list, *, repeats: int = 3, batch_sizes=(1, 4)) -> dict:
    s = engine.settings
    small, large = engine.small, engine.large
    works = engine.prepare(items)
    engine.small_pass(works)  # also warms up the small model
    bad = [w.error for w in works if w.error]
    if bad:
        raise ValueError(f"benchmark items failed: {bad[0]}")
    limits = [s.max_new_tokens] * len(works)

    def rows(m):
        return m.family.rows(m.model, [w.encoded.small if m is small else w.encoded.large for w in works])

    def small_no_capture():
        batch = collate(rows(small), small.pad_id, rows_device(small.model))
        return greedy(small.model, batch, limits, small.eos_ids, small.pad_id)

    kept = [top_k_in_order(w.small.importance, n_keep(len(w.small.importance), s.retain)) for w in works]

    def large_full():
        batch = collate(rows(large), large.pad_id, rows_device(large.model))
        return greedy(large.model, batch, limits, large.eos_ids, large.pad_id)

    def large_pruned():
        return engine.generate_kept(works, rows(large), kept, s.prune_layer, limits)

    encs_large = [w.encoded.large for w in works]

    def large_vision():  # not reduced by pruning: timed alone so the LM stage can be compared with its FLOPs
        large.family.image_features(large.model, encs_large)

    records: dict[int, list[dict]] = {}  # the last timed run's records, per batch size
    engines = {b: Engine(dataclasses.replace(s, batch_size=b), small, large) for b in batch_sizes}
    stages: dict[str, Callable] = {
        "small_no_capture": small_no_capture,
        "small_capture": lambda: engine.small_answer(works),
        "large_vision": large_vision,
        "large_full": large_full,
        "large_pruned": large_pruned,
        **{f"sgl_batch{b}": (lambda b=b, e=e: records.__setitem__(b, list(e.run(items))))
           for b, e in engines.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in stages}
    with torch.inference_mode():
        for _ in range(repeats):  # interleaved: each round measures every stage once
            for name, fn in stages.items():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        gen_full = large_full().tokens
        gen_pruned = large_pruned().tokens

    ms = {k: _median_ms(v) for k, v in times.items()}
    n = len(items)
    macs_full = sum(lm_macs(large.model, len(w.encoded.visual), len(t)) for w, t in zip(works, gen_full))
    macs_pruned = 0.0
    for w, k, t in zip(works, kept, gen_pruned):
        n_full, n_kept = len(w.encoded.visual), len(w.encoded.visual) - w.encoded.n_visual + len(k)
        layers = large.num_layers
        # Layers < K run on the full sequence, the rest on the kept one.
        macs_pruned += (s.prune_layer * lm_macs(large.model, n_full, len(t))
                        + (layers - s.prune_layer) * lm_macs(large.model, n_kept, len(t))) / layers
    # The floor: the unpruned LM time scaled by the FLOPs ratio (the vision tower is the same in both).
    lm_full, lm_pruned = ms["large_full"] - ms["large_vision"], ms["large_pruned"] - ms["large_vision"]
    predicted = lm_full * macs_pruned / macs_full
    sgl_records = records[batch_sizes[0]]
    return {
        "items": n,
        "visual_tokens": statistics.mean(w.encoded.n_visual for w in works),
        "retained_tokens": statistics.mean(len(k) for k in kept),
        "retain": s.retain,
        "prune_layer": s.prune_layer,
        "exit_rate": sum(r["exit"] == "small" for r in sgl_records) / n,
        "ms_per_item": {k: v / n for k, v in ms.items()},
        "items_per_s": {
            "large_full": n / (ms["large_full"] / 1000),
            "large_pruned": n / (ms["large_pruned"] / 1000),
            "sgl": n / (ms[f"sgl_batch{batch_sizes[0]}"] / 1000),
            **{f"sgl_batch{b}": n / (ms[f"sgl_batch{b}"] / 1000) for b in batch_sizes},
        },
        "macs": {"large_full": macs_full / n, "large_pruned": macs_pruned / n},
        "capture_overhead": ms["small_capture"] / ms["small_no_capture"],
        "speedup_large_stage": ms["large_full"] / ms["large_pruned"],
        "flops_speedup_large_stage": macs_full / macs_pruned,
        "large_vs_floor": lm_pruned / predicted,
        "speedup_large_lm": lm_full / lm_pruned,
        "batch_speedup": {f"{b}_vs_{batch_sizes[0]}": ms[f"sgl_batch{batch_sizes[0]}"] / ms[f"sgl_batch{b}"]
                          for b in batch_sizes[1:]},
        "peak_memory_mb": _peak_mb(),
        "device": _device_name(large.model),
    }


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _device_name(model) -> str:
    dev = rows_device(model)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"
