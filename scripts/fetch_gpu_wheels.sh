#!/usr/bin/env bash
# The wheels scripts/gpu_bench.py may need on a GPU machine without network (Python 3.12, torch, transformers
# 5.17 and accelerate of its own), downloaded into .whl/ (git-ignored) where a package index is reachable.
# gpu_bench.py installs only those whose package is missing there or outside what sgl admits:
#   transformers 5.24.0      sgl admits 5.18-5.25; the machine has 5.17
#   huggingface_hub 1.33.0   transformers 5.24 needs >= 1.31 (5.17 needed >= 1.5); the 1.x line keeps httpx
#   pillow 13.0.0            sgl's processors read images (torch does not bring it)
# Not carried: typer and click (gpu_bench.py runs sgl's library, not its command line), tokenizers, safetensors
# and regex (transformers 5.17 already needed the same bounds), hf_xet (downloads only), bitsandbytes (43 MB: with
# it the wheels would not stay well under 60 MB; NF4 runs only where the machine has it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps -d .whl transformers==5.24.0 huggingface_hub==1.33.0
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pillow==13.0.0
ls -l .whl
du -ch .whl/*.whl | tail -1
