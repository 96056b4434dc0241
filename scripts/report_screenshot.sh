#!/usr/bin/env bash
# Regenerates docs/report.png, the README's screenshot: a real `sgl report` of a demo run of the built-in pair,
# rendered by headless Chromium (Debian's `chromium`). Run from an environment where `sgl` is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sgl demo "$work/demo" --n 48 --seed 2028 2> /dev/null
sgl run "$work/demo/batch.jsonl" --save-scores -q
sgl report "$work/demo/batch.sgl.jsonl" -o "$work/report.html" --title "sgl report: 48 demo items" > /dev/null
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$work/profile" --hide-scrollbars \
    --window-size=1280,1700 --screenshot="$PWD/docs/report.png" "file://$work/report.html" 2> /dev/null
echo "wrote docs/report.png"
