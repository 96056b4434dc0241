#!/usr/bin/env python3
"""The GPU benchmark in one script: `sgl bench --arch qwen2.5-vl-3b-7b` in bfloat16 at 1,024 and 2,048 visual
tokens per image, batch 1/8/32, 50% forced exits, retain 0.09, K = 0; the batch-8 pipeline profiled once; the
large model in NF4 when bitsandbytes is importable; and the large stages on transformers and vLLM side by side
(`--large-backend transformers,vllm` at 1,024 tokens, batch 1/8) when vllm is importable. Everything it writes goes
to $OUT (8 files at most).

Made for a machine without network that has torch, transformers and accelerate of its own: sgl runs from this
tree (not installed), through its library (`Bench`, what `sgl bench` runs: the command-line packages there, typer
and click, are not needed and their versions do not matter), and the wheels carried in `.whl/`
(scripts/fetch_gpu_wheels.sh) are installed with `pip install --no-index --no-deps --target /tmp/site` only for the
packages the engine imports whose installed version sgl does not admit (or that are missing);
`PYTHONPATH=/tmp/site:$PWD` puts them first. Each step runs in its own process, within the time left, and the
summary is rewritten after each, so a step that fails or runs out of time loses only itself.

    python3 scripts/gpu_bench.py               # on the GPU machine (about 5 minutes; stops itself by 7)
    python3 scripts/gpu_bench.py --dry-run     # the same steps, small, on a CPU (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")
BUDGET_S = 420  # every step together; a step that cannot start with enough time left is skipped
# What the engine needs of each package it imports on that machine (pyproject.toml, and transformers 5.24's own
# needs). A package outside these with no carried wheel is reported and the run goes on: it may still work.
NEEDS = {"transformers": ">=5.18.0,<5.26", "huggingface_hub": ">=1.31.0,<3.0", "tokenizers": ">=0.23.1,<0.24",
         "safetensors": ">=0.8.0", "regex": ">=2025.10.22", "accelerate": ">=1.1.0,<1.17", "pillow": ">=10",
         "pyyaml": ">=6", "numpy": ">=1.17"}


def log(out: Path, message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(out / "run.log", "a") as f:
        f.write(line + "\n")


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def prepare_site(out: Path, force: bool) -> dict:
    """Install the carried wheels whose package is missing or outside NEEDS; returns what was found and done."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    here = set(sys_tags())
    wheels = {_norm(w.name.split("-")[0]): w for w in sorted((ROOT / ".whl").glob("*.whl"))
              if parse_wheel_filename(w.name)[3] & here}  # a dry run on another Python skips binary wheels
    report = {"installed": {}, "carried": sorted(w.name for w in wheels.values()), "from_wheels": []}
    for name, spec in NEEDS.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        report["installed"][name] = have
        ok = have is not None and have in SpecifierSet(spec)
        if (force or not ok) and name in wheels:
            report["from_wheels"].append(wheels[name].name)
        elif not ok:
            log(out, f"warning: {name} {have or 'is missing'}: sgl needs {name}{spec}, and .whl/ carries none "
                     "(scripts/fetch_gpu_wheels.sh, where a package index is reachable); going on")
    shutil.rmtree(SITE, ignore_errors=True)  # a stale one would come first on PYTHONPATH
    if report["from_wheels"]:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(SITE), *(str(ROOT / ".whl" / w) for w in report["from_wheels"])], check=True)
    log(out, f"wheels installed into {SITE}: {', '.join(report['from_wheels']) or 'none needed'}")
    return report


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def command_line(setup: dict, run: dict) -> str:
    """The `sgl bench` command line that does what one step does."""
    args = ["sgl", "bench"]
    for key, value in {**setup, **run}.items():
        flag = "--" + key.replace("_", "-")
        if key == "batch_sizes":
            args += [flag, ",".join(str(b) for b in value)]
        elif value is not None and value is not False:
            args += [flag] if value is True else [flag, str(value)]
    return " ".join(args + ["--json"])


def step(spec: str) -> None:
    """In its own process: one benchmark through the library (`Bench`, as `sgl bench` runs it), its JSON on
    stdout, between markers (anything else a library prints stays out of it)."""
    sys.path.insert(0, str(ROOT))
    from sgl_cli.engine import Bench

    setup, run = json.loads(spec)
    bench = Bench(**setup)
    try:
        engine, items = bench.load(None, max(run["batch_sizes"]))
        result = bench.run(engine, items, batch_sizes=tuple(run["batch_sizes"]), repeats=run["repeats"],
                           exit_rate=run["exit_rate"], profile=Path(run["profile"]) if run.get("profile") else None,
                           progress=lambda message: print(message, file=sys.stderr, flush=True))
    finally:
        bench.close()  # vLLM's engine processes
    print("\n@@json\n" + json.dumps(result) + "\n@@end", flush=True)


def bench(out: Path, name: str, setup: dict, run: dict, deadline: float, reserve: float) -> dict | None:
    """One benchmark into out/<name>.json, stopped at the deadline less `reserve` (time kept for the steps after
    it); None, logged, when it fails or runs out of time."""
    left = deadline - time.monotonic() - reserve
    if left < 30:
        log(out, f"{name}: skipped, {left:.0f} s left")
        return None
    log(out, f"{name}: {command_line(setup, run)} (at most {left:.0f} s)")
    t0 = time.monotonic()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", json.dumps([setup, run])]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        log(out, f"{name}: stopped after {left:.0f} s\n{tail[-2000:]}")
        return None
    with open(out / "run.log", "a") as f:
        f.write(proc.stderr[-4000:])
    if proc.returncode != 0 or "@@json\n" not in proc.stdout:
        log(out, f"{name}: exit {proc.returncode}")
        return None
    text = proc.stdout.split("@@json\n", 1)[1].split("\n@@end", 1)[0]
    try:
        result = json.loads(text)
    except ValueError as exc:
        log(out, f"{name}: unreadable result ({exc})")
        return None
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    log(out, f"{name}: done in {time.monotonic() - t0:.0f} s")
    return result


def summarize(results: dict) -> dict:
    """The table docs/benchmark.md takes: per run and batch size, items/s per stage and the ratios."""
    rows = []
    for name, r in results.items():
        if not r:
            continue
        for backend, section in (r.get("backends") or {"transformers": r}).items():  # one per large backend
            for b, row in section["batches"].items():
                rows.append({"run": name, "backend": backend, "visual_tokens": r["visual_tokens"], "batch": int(b),
                             "items_per_s": row["items_per_s"], "peak_memory_mb": row["peak_memory_mb"],
                             "gmac_per_s": row["gmac_per_s"], "ratios": row["ratios"],
                             "identical_to_batch_1": row["identical_to_batch_1"]})
    out = {"rows": rows, "targets": {n: r["targets"] for n, r in results.items() if r},
           # What each engine ran with (vLLM's prefix caching among it) and the matmul peaks every stage stayed under.
           "engine_options": {n: r["engine_options"] for n, r in results.items() if r},
           "matmul_peaks": {n: r["matmul_peaks"] for n, r in results.items() if r}}
    cross = {n: r["cross_backend"] for n, r in results.items() if r and "cross_backend" in r}
    if cross:  # vLLM's items/s over transformers', per large stage and the pipeline
        out["cross_backend"] = cross
    bf16, nf4 = results.get("bench_2048"), results.get("bench_2048_nf4")
    if bf16 and nf4:  # NF4 large model within 1.5x of bf16 time, at batch 8 (or the nearest both measured)
        b = min(set(bf16["batches"]) & set(nf4["batches"]), key=lambda x: abs(int(x) - 8))
        ratio = nf4["batches"][b]["ms_per_item"]["large"] / bf16["batches"][b]["ms_per_item"]["large"]
        out["nf4_vs_bf16_large_time"] = {"batch": int(b), "value": round(ratio, 4), "target": "<= 1.5",
                                         "met": ratio <= 1.5}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same steps, small, on a CPU")
    parser.add_argument("--force-wheels", action="store_true", help="install every carried wheel, needed or not")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: one benchmark, in its own process
    a = parser.parse_args()
    if a.step:
        return step(a.step)
    out = Path(os.environ.get("OUT") or ROOT / "gpu-bench-out")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S * (3 if a.dry_run else 1)
    log(out, f"python {sys.version.split()[0]}, out {out}, dry run: {a.dry_run}")
    found = prepare_site(out, a.force_wheels)
    probe = subprocess.run([sys.executable, "-c", "import torch, transformers, sgl_cli; print(torch.__version__, "
                            "transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() "
                            "else 'cpu')"], cwd=ROOT, env=env(), capture_output=True, text=True)
    log(out, f"torch, transformers, device: {probe.stdout.strip() or probe.stderr[-1500:]}")
    setup = {"arch": "qwen2.5-vl-3b-7b", "retain": 0.09, "prune_layer": 0}
    run = {"exit_rate": 0.5}
    if a.dry_run:  # the same steps on a CPU: two layers, one vision block, a few tokens, batch 1 and 2
        setup |= {"dtype": "float32", "layers": 2, "vision_layers": 1, "max_new_tokens": 4}
        run |= {"batch_sizes": [1, 2], "repeats": 1}
        tokens = (16, 32)
    else:
        # One timed round after the warm-up round: ~2 x 100 s at 2,048 tokens by the FLOPs and launch estimate in
        # docs/benchmark.md; a dedicated GPU varies by a few percent between rounds.
        setup |= {"dtype": "bfloat16", "max_new_tokens": 8}
        run |= {"batch_sizes": [1, 8, 32], "repeats": 1}
        tokens = (1024, 2048)
    nf4 = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env(), capture_output=True).returncode == 0
    vllm = subprocess.run([sys.executable, "-c", "import vllm"], env=env(), capture_output=True).returncode == 0
    results: dict = {}

    def save_summary() -> None:  # after every step: a later step that fails or times out loses only itself
        summary = {"env": found, "probe": probe.stdout.strip(), "nf4_available": nf4, "vllm_available": vllm,
                   **summarize(
            {k.replace(f"_{tokens[0]}", "_1024").replace(f"_{tokens[1]}", "_2048"): v for k, v in results.items()})}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    # 2,048 first (the targets are read there), with the profile; then 1,024 in what is left.
    big, small = f"bench_{tokens[1]}", f"bench_{tokens[0]}"
    results[big] = bench(out, big, {**setup, "visual_tokens": tokens[1]}, {**run, "profile": str(out / "profile")},
                         deadline, reserve=0 if a.dry_run else 120)
    save_summary()
    reserve = 0 if a.dry_run else 60 * nf4 + 120 * vllm  # what the NF4 and vLLM steps need after it
    results[small] = bench(out, small, {**setup, "visual_tokens": tokens[0]}, run, deadline, reserve=reserve)
    save_summary()
    if nf4:
        nf4_run = run if a.dry_run else {**run, "batch_sizes": [8]}  # the target's batch size only
        results[f"{big}_nf4"] = bench(out, f"{big}_nf4", {**setup, "visual_tokens": tokens[1], "quantize": "4bit"},
                                      nf4_run, deadline, reserve=0 if a.dry_run or not vllm else 120)
        save_summary()
    else:
        log(out, "NF4: skipped, bitsandbytes is not importable here (its wheel, 43 MB, does not fit what is carried)")
    if vllm:
        # The same arch at 1,024 tokens with the large stages on both backends, in the same rounds (vLLM gets the
        # config and processor in a folder and makes random weights of its own: timings compare, answers do not).
        # The dry run measures the tiny built-in pair instead: the arch twice over (in memory and in vLLM) does not
        # fit beside other work in a small CPU machine's memory.
        both = {"large_backend": "transformers,vllm"}
        vllm_setup = {"size": "tiny", "max_new_tokens": 4, **both} if a.dry_run else \
            {**setup, "visual_tokens": tokens[0], **both}
        vllm_run = run if a.dry_run else {**run, "batch_sizes": [1, 8]}
        results[f"{small}_vllm"] = bench(out, f"{small}_vllm", vllm_setup, vllm_run, deadline, reserve=0)
        save_summary()
    else:
        log(out, "vLLM: skipped, vllm is not importable here (pip install 'sgl-cli[vllm]' on the GPU machine)")
    log(out, f"done: {', '.join(sorted(p.name for p in out.rglob('*') if p.is_file()))}")


if __name__ == "__main__":
    main()
