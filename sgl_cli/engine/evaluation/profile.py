"""What `sgl bench` measures besides time: peak memory per stage, and one profiled pipeline run.

`StagePeak`: on a GPU, `torch.cuda.max_memory_allocated` reset at the stage's start; on the CPU, the process's
resident set sampled every 2 ms while the stage runs (the OS's own peak cannot be reset).

`profile_pipeline`: one `Engine` batch under `torch.profiler` (CPU and, on a GPU, CUDA activities), written as
small text tables and a JSON summary: the top CPU and CUDA ops, and the time the GPU sits idle (wall time not
covered by any CUDA kernel, over wall time), with the host synchronisations that cause much of it.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path

import torch

from ..core.generate import rows_device


def device_name(model) -> str:
    dev = rows_device(model)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({torch.get_num_threads()} threads)"


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the process's peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StagePeak:
    """`with StagePeak(model) as p: ...; p.synchronize()` then `p.mb`: the stage's peak memory in MiB."""

    def __init__(self, model):
        self.device = rows_device(model)
        self.cuda = self.device.type == "cuda"
        self.mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "StagePeak":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.mb = max(self.mb, _rss_mb())

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.mb = max(self.mb, _rss_mb())


# Host-side calls that wait for the GPU (or read a device value back): each one drains the queue of kernels.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpy", "cudaMemcpyAsync")


def _covered_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_pipeline(engine, items: list, out: Path, *, trace: bool = False, rows: int = 25) -> dict:
    """Run `engine.process(items)` once (after one untimed run) under the profiler; write cpu_ops.txt,
    cuda_ops.txt (on a GPU), summary.json and, with `trace`, trace.json into `out`. Returns the summary."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = rows_device(engine.large.model).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    engine.process(items)  # warm-up: first-call costs are not what the profile is for
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        t0 = time.perf_counter()
        engine.process(items)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    averages = prof.key_averages()
    (out / "cpu_ops.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    kernels = []
    if cuda:
        (out / "cuda_ops.txt").write_text(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
        kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = _covered_us(kernels)
    counts = {e.key: e.count for e in averages if e.key in SYNC_OPS}
    top_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    summary = {
        "items": len(items),
        "batch_size": engine.settings.batch_size,
        "wall_ms": round(wall_us / 1000, 3),
        "gpu_busy_ms": round(busy_us / 1000, 3) if cuda else None,
        "gpu_idle_fraction": round(1 - busy_us / wall_us, 4) if cuda else None,
        "cuda_kernels": len(kernels),
        "host_syncs": counts,
        "top_cpu_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)}
                        for e in top_cpu],
    }
    if cuda:
        top_cuda = sorted(averages, key=lambda e: e.self_device_time_total, reverse=True)[:rows]
        summary["top_cuda_ops"] = [{"op": e.key, "calls": e.count,
                                    "self_cuda_ms": round(e.self_device_time_total / 1000, 3)} for e in top_cuda]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    return summary
