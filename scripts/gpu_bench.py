#!/usr/bin/env python3
"""The GPU benchmark in one script: `sgl bench --arch qwen2.5-vl-3b-7b` in bfloat16 at 1,024 and 2,048 visual
tokens per image, batch 1/8/32, 50% forced exits, retain 0.09, K = 0; the batch-8 pipeline profiled once; and the
large model in NF4 when bitsandbytes is importable. Everything it writes goes to $OUT (8 files at most).

Made for a machine without network that has torch, transformers and accelerate of its own: sgl runs from this
tree (`python3 -m sgl_cli`, not installed), and the wheels carried in `.whl/` (scripts/fetch_gpu_wheels.sh) are
installed with `pip install --no-index --no-deps --target /tmp/site` only for the packages whose installed
version sgl does not admit (or that are missing); `PYTHONPATH=/tmp/site:$PWD` puts them first.

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
# What sgl needs of each package it imports on that machine (pyproject.toml, and transformers 5.24's own needs).
NEEDS = {"transformers": ">=5.18.0,<5.25", "huggingface_hub": ">=1.31.0,<3.0", "tokenizers": ">=0.23.1,<0.24",
         "safetensors": ">=0.8.0", "regex": ">=2025.10.22", "accelerate": ">=1.1.0,<1.16", "pillow": ">=10",
         "click": ">=8.4.2", "typer": ">=0.12", "rich": ">=13", "pyyaml": ">=6", "tqdm": ">=4.66", "numpy": ">=1.17"}


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
            raise SystemExit(f"{name} {have or 'is missing'}: sgl needs {name}{spec}, and .whl/ carries none "
                             "(run scripts/fetch_gpu_wheels.sh where a package index is reachable)")
    if report["from_wheels"]:
        shutil.rmtree(SITE, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        str(SITE), *(str(ROOT / ".whl" / w) for w in report["from_wheels"])], check=True)
    log(out, f"wheels installed into {SITE}: {', '.join(report['from_wheels']) or 'none needed'}")
    return report


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def bench(out: Path, name: str, args: list[str], deadline: float, reserve: float) -> dict | None:
    """One `sgl bench ... --json` into out/<name>.json, stopped at the deadline less `reserve` (time kept for the
    steps after it)."""
    left = deadline - time.monotonic() - reserve
    if left < 30:
        log(out, f"{name}: skipped, {left:.0f} s left")
        return None
    cmd = [sys.executable, "-m", "sgl_cli", "bench", *args, "--json"]
    log(out, f"{name}: {' '.join(cmd[2:])} (at most {left:.0f} s)")
    t0 = time.monotonic()
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired as exc:
        log(out, f"{name}: stopped after {left:.0f} s\n{(exc.stderr or b'')[-2000:]!s}")
        return None
    with open(out / "run.log", "a") as f:
        f.write(run.stderr[-4000:])
    if run.returncode != 0:
        log(out, f"{name}: exit {run.returncode}")
        return None
    (out / f"{name}.json").write_text(run.stdout)
    log(out, f"{name}: done in {time.monotonic() - t0:.0f} s")
    return json.loads(run.stdout)


def summarize(results: dict) -> dict:
    """The table docs/benchmark.md takes: per run and batch size, items/s per stage and the ratios."""
    rows = []
    for name, r in results.items():
        if not r:
            continue
        for b, row in r["batches"].items():
            rows.append({"run": name, "visual_tokens": r["visual_tokens"], "batch": int(b),
                         "items_per_s": row["items_per_s"], "peak_memory_mb": row["peak_memory_mb"],
                         "ratios": row["ratios"], "identical_to_batch_1": row["identical_to_batch_1"]})
    out = {"rows": rows, "targets": {n: r["targets"] for n, r in results.items() if r}}
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
    a = parser.parse_args()
    out = Path(os.environ.get("OUT") or ROOT / "gpu-bench-out")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S * (3 if a.dry_run else 1)
    log(out, f"python {sys.version.split()[0]}, out {out}, dry run: {a.dry_run}")
    found = prepare_site(out, a.force_wheels)
    probe = subprocess.run([sys.executable, "-c", "import torch, transformers, sgl_cli; print(torch.__version__, "
                            "transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() "
                            "else 'cpu')"], cwd=ROOT, env=env(), capture_output=True, text=True)
    log(out, f"torch, transformers, device: {probe.stdout.strip() or probe.stderr[-1500:]}")
    common = ["--arch", "qwen2.5-vl-3b-7b", "--exit-rate", "0.5", "--retain", "0.09", "--prune-layer", "0"]
    if a.dry_run:  # the same steps on a CPU: two layers, one vision block, a few tokens, batch 1 and 2
        common += ["--dtype", "float32", "--layers", "2", "--vision-layers", "1", "--batch-sizes", "1,2",
                   "--repeats", "1", "--max-new-tokens", "4"]
        tokens = (16, 32)
    else:
        # One timed round after the warm-up round: ~2 x 100 s at 2,048 tokens by the FLOPs and launch estimate in
        # docs/benchmark.md; a dedicated GPU varies by a few percent between rounds.
        common += ["--dtype", "bfloat16", "--batch-sizes", "1,8,32", "--repeats", "1", "--max-new-tokens", "8"]
        tokens = (1024, 2048)
    nf4 = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env(), capture_output=True).returncode == 0
    results = {}
    # 2,048 first (the targets are read there), with the profile; then 1,024 in what is left.
    results[f"bench_{tokens[1]}"] = bench(out, f"bench_{tokens[1]}", [*common, "--visual-tokens", str(tokens[1]),
                                                                      "--profile", str(out / "profile")],
                                          deadline, reserve=0 if a.dry_run else 120)
    results[f"bench_{tokens[0]}"] = bench(out, f"bench_{tokens[0]}", [*common, "--visual-tokens", str(tokens[0])],
                                          deadline, reserve=0 if a.dry_run or not nf4 else 60)
    if nf4:
        nf4_args = [*common, "--visual-tokens", str(tokens[1]), "--quantize", "4bit"]
        if not a.dry_run:
            nf4_args += ["--batch-sizes", "8"]  # the target's batch size only
        results[f"bench_{tokens[1]}_nf4"] = bench(out, f"bench_{tokens[1]}_nf4", nf4_args, deadline, reserve=0)
    else:
        log(out, "NF4: skipped, bitsandbytes is not importable here (its wheel, 43 MB, does not fit what is carried)")
    summary = {"env": found, "probe": probe.stdout.strip(), "nf4_available": nf4, **summarize(
        {k.replace(f"_{tokens[0]}", "_1024").replace(f"_{tokens[1]}", "_2048"): v for k, v in results.items()})}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(out, f"done: {', '.join(sorted(p.name for p in out.rglob('*') if p.is_file()))}")


if __name__ == "__main__":
    main()
