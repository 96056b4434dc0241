"""What `sgl bench` computes its figures from: the multiply-adds of each stage (`lm_macs` for the language models,
method.md section 6, from the configs; the vision towers counted by torch's FlopCounter), the device's own matmul
peak measured in the same run (and the check that no stage claims more: `check_claims`), the speed-ups measured and
predicted (`ratios`), and the targets of a GPU run."""

from __future__ import annotations

import os
import statistics
import time
import types

import torch

from ..backends.base import LargeBackend
from ..backends.transformers import NOT_QUANTIZED
from ..errors import SglError
from ..guides.base import n_keep

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


def compute_of(m: LargeBackend) -> tuple[str, int] | None:
    """(torch device, how many run in parallel) of a large backend's arithmetic: an in-process model's device; a
    backend's engine options' `device` and `tensor_parallel_size` (vLLM's, on this machine); None for a backend
    that does not say where it computes (a plugin's engine may be elsewhere, or be no model: echo)."""
    if in_process(m):
        return device_key(m.model.device), 1
    options = m.engine_options()
    if not options.get("device"):
        return None
    return device_key(options["device"]), int(options.get("tensor_parallel_size") or 1)


def arithmetic(dtype: str | None) -> str:
    """The dtype a model's products run in: its weights' (a quantized model's first weights are its compute
    dtype's; anything else: float32)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def device_key(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def peak_of(compute: tuple[str, str, int] | None, peaks: dict) -> dict | None:
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
            elif where == "large":
                peak = large_peak
            else:
                peak = pipeline_peak(small_peak, large_peak)
            if claims[stage] > peak["gmac_per_s"]:
                owner = "the small model" if where == "small" else name
                raise SglError(
                    f"{owner}'s {stage} stage at batch {b} claims {claims[stage]:.1f} GMAC/s ({gmac:.2f} GMAC per "
                    f"item in {ms:.1f} ms), above the {peak['dtype']} matmul peak measured on {peak['device']}"
                    + (f" x{peak['parallel']}" if peak["parallel"] > 1 else "") + f" in this run, "
                    f"{peak['gmac_per_s']:.1f} GMAC/s: a cache served it or its FLOPs are miscounted; not reported")
        row["gmac_per_s"] = claims


def pipeline_peak(small_peak: dict, large_peak: dict) -> dict:
    """The most the pipeline's two stages can do at once: on one device, its peak (they share it: a CPU's peak is
    measured with every core); on two, both peaks together (the streaming pipeline runs them at once)."""
    if small_peak["device"] == large_peak["device"]:
        return max((small_peak, large_peak), key=lambda x: x["gmac_per_s"])
    return {"device": f"{small_peak['device']} + {large_peak['device']}", "dtype": large_peak["dtype"],
            "parallel": 1, "gmac_per_s": round(small_peak["gmac_per_s"] + large_peak["gmac_per_s"], 3)}


def same_tower(a: LargeBackend, b: LargeBackend) -> bool:
    """Whether two large backends' configs give the same vision tower (so one's FLOPs count serves both)."""
    def tower(m):
        c = m.model.config.to_dict()
        return {k: v for k, v in c.items() if "vision" in k or k in ("image_token_id", "architectures")}

    skip = ("dtype", "torch_dtype", "_attn_implementation", "_name_or_path", "architectures")

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in skip}

    return a is b or clean(tower(a)) == clean(tower(b))


def dtype_of(m: LargeBackend) -> str | None:
    """The dtype the large model's engine runs in (as it resolved "auto"), else the spec's."""
    return m.engine_options().get("dtype") or m.spec.dtype


def stage_flops(engine, large: LargeBackend, works, kept, gen: dict, prune_layers, k0: int, records,
                vision_reference=None) -> dict:
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


def ratios(per_item: dict, b: int, b0: int, prune_layers, flops: dict, exit_rate: float | None = None) -> dict:
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


def targets(batches: dict, batch_sizes, k: int) -> list[dict]:
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
