"""`sgl bench`: the FLOPs model by hand, and the JSON report's figures on the tiny pair."""

from __future__ import annotations

import json
import types

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.evaluation.bench import lm_macs


def test_lm_macs_by_hand():
    cfg = types.SimpleNamespace(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=10)
    model = types.SimpleNamespace(config=types.SimpleNamespace(get_text_config=lambda: cfg))
    # per token per layer: 2*8*8 + 2*8*4 + 3*8*16 = 128 + 64 + 384 = 576
    # prefill n=3: 2 layers * (3*576 + 9*8) + 8*10 = 2*(1728 + 72) + 80 = 3680
    # decode t=0: 2 * (576 + 2*3*8) + 80 = 2*624 + 80 = 1328; t=1: 2 * (576 + 2*4*8) + 80 = 2*640 + 80 = 1360
    assert lm_macs(model, 3, 0) == 3680
    assert lm_macs(model, 3, 2) == 3680 + 1328 + 1360


def test_bench_json_report():
    res = CliRunner().invoke(app, ["bench", "--size", "tiny", "--items", "2", "--repeats", "1", "--json",
                                   "--batch-size", "2", "--max-new-tokens", "3", "--retain", "0.25"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert set(r["items_per_s"]) >= {"large_full", "large_pruned", "sgl"}
    assert all(v > 0 for v in r["items_per_s"].values())
    assert r["capture_overhead"] > 0 and r["speedup_large_stage"] > 0 and r["large_vs_floor"] > 0
    assert r["flops_speedup_large_stage"] == pytest.approx(r["macs"]["large_full"] / r["macs"]["large_pruned"])
    assert r["flops_speedup_large_stage"] > 1.5  # a quarter of the visual tokens
    assert r["retained_tokens"] == max(1, int(0.25 * r["visual_tokens"]))
