"""`sgl bench --large-backend transformers,vllm` on the tiny built-in pair (one folder both backends load): the report
has a section per backend with the documented stages (no `vision` stage and no LM-only ratios on vLLM, whose tower
runs inside its engine), the top-level figures are the first backend's, the pipeline's answers on vLLM equal the
transformers ones item by item (and batch b equals batch 1 on both), and the cross-backend ratios are the
sections' items/s divided. One bench run, one vLLM engine load."""

from __future__ import annotations

import gc
import json
import os

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app

SHARED = {"small", "small_capture", "small_stage"}
LARGE = {"large", "pruned_k0", "pipeline", "pipeline_serial"}


@pytest.fixture(scope="module")
def report():
    res = CliRunner().invoke(app, ["bench", "--size", "tiny", "--items", "4", "--batch-sizes", "1,2", "--repeats", "1",
                                   "--max-new-tokens", "3", "--large-backend", "transformers,vllm", "--vllm",
                                   "max_model_len=2048,gpu_memory_utilization=0.05", "--json"])
    gc.collect()
    assert res.exit_code == 0, res.output[-3000:]
    return json.loads(res.stdout)  # vLLM's own logs went to stderr


def test_both_backends_have_their_sections(report):
    r = report
    assert r["large_backends"] == ["transformers", "vllm"] and list(r["backends"]) == ["transformers", "vllm"]
    t, v = r["backends"]["transformers"], r["backends"]["vllm"]
    assert t["device"].startswith("cpu") and v["device"] == "vllm:cpu x1"
    assert t["dtype"] == v["dtype"] == "float32"
    assert t["vision_stage"] and not v["vision_stage"]
    assert v["same_weights"] and t["same_weights"]
    # The top-level figures are the first backend's (what every consumer of a one-backend report reads).
    assert r["batches"] == t["batches"] and r["flops"] == t["flops"] and r["targets"] == t["targets"]
    assert r["device"] == t["device"]
    for b in ("1", "2"):
        tb, vb = t["batches"][b], v["batches"][b]
        assert set(tb["ms_per_item"]) == SHARED | LARGE | {"vision"}
        assert set(vb["ms_per_item"]) == SHARED | LARGE  # vision: absent, not zero
        assert all(x > 0 for x in vb["items_per_s"].values())
        for stage, ms in vb["ms_per_item"].items():
            assert vb["items_per_s"][stage] == pytest.approx(1000 / ms, rel=1e-3)
        # The small model's stages are measured once, for both.
        assert {s: vb["ms_per_item"][s] for s in SHARED} == {s: tb["ms_per_item"][s] for s in SHARED}
        # Memory is sampled in this process: vLLM's engine runs in processes of its own.
        assert set(vb["peak_memory_mb"]) == SHARED and set(tb["peak_memory_mb"]) == SHARED | LARGE | {"vision"}
        assert "lm_speedup_k0" in tb["ratios"] and not any(k.startswith("lm_") for k in vb["ratios"])
        assert vb["ratios"]["large_stage_speedup_k0"] == pytest.approx(
            vb["ms_per_item"]["large"] / vb["ms_per_item"]["pruned_k0"], rel=1e-2)
        assert tb["identical_to_batch_1"] and vb["identical_to_batch_1"]
        assert tb["exit_rate"] == vb["exit_rate"] == 0.5
    assert [x["figure"] for x in v["targets"]] == [x["figure"] for x in t["targets"]]


def test_vllm_answers_the_pipeline_as_transformers_does(report):
    t, v = report["backends"]["transformers"], report["backends"]["vllm"]
    assert len(t["pipeline_answers"]) == 4
    assert [e for _, e in t["pipeline_answers"]].count("large") == 2  # half exit: two answers are the large model's
    assert v["pipeline_answers"] == t["pipeline_answers"]
    cross = report["cross_backend"]["vllm_over_transformers"]
    assert cross["same_pipeline_answers"] and cross["pipeline_answers_differing"] == 0
    # Comparable work: the same tokens generated per item on every large stage, the same FLOPs.
    assert v["tokens_generated"] == t["tokens_generated"] == {"large": 3, "pruned_k0": 3, "pipeline": 3}
    assert v["flops"] == t["flops"]


def test_cross_backend_ratios_are_the_sections_items_per_s(report):
    t, v = report["backends"]["transformers"], report["backends"]["vllm"]
    cross = report["cross_backend"]["vllm_over_transformers"]["items_per_s"]
    assert set(cross) == {"1", "2"}
    for b, row in cross.items():
        assert set(row) == LARGE
        for stage, x in row.items():
            assert x == pytest.approx(v["batches"][b]["items_per_s"][stage] / t["batches"][b]["items_per_s"][stage],
                                      rel=1e-3)


def test_vllm_ran_without_prefix_caching_and_the_report_says_so(report):
    """sgl bench turns vLLM's prefix caching off (vLLM's own default is on) and says so, with every option its
    engine resolved; every stage's GMAC/s stayed under the CPU's matmul peak measured in the same run, and every
    timed call had items of its own."""
    v = report["backends"]["vllm"]["engine_options"]
    assert report["engine_options"]["vllm"] == v and set(report["engine_options"]) == {"small", "transformers", "vllm"}
    assert v["engine"] == "vllm" and v["device"] == "cpu" and v["vllm_version"] == "0.32.0"
    assert v["enable_prefix_caching"] is False
    assert v["max_num_seqs"] == 2 and v["max_model_len"] == 2048 and v["gpu_memory_utilization"] == 0.05
    assert v["enforce_eager"] is True and v["dtype"] == "float32" and v["tensor_parallel_size"] == 1
    assert v["mm_processor_cache_gb"] == 0 and v["enable_chunked_prefill"] is True
    assert v["max_num_batched_tokens"] >= 2048 and v["encoder_cache_size"] >= 1 and v["block_size"] >= 1
    assert v["VLLM_CPU_KVCACHE_SPACE"] == os.environ["VLLM_CPU_KVCACHE_SPACE"]
    assert report["engine_options"]["transformers"]["engine"] == "transformers"
    # 2 rounds x (the stages' 1 + 2, each pipeline's (streaming, serial) 4 at both batch sizes)
    assert report["fresh_items"] == 2 * (1 + 2 + 2 * 4 * 2)
    peaks = report["matmul_peaks"]
    assert (peaks["vllm"]["device"], peaks["vllm"]["dtype"], peaks["vllm"]["parallel"]) == ("cpu", "float32", 1)
    assert peaks["vllm"] == peaks["transformers"] == peaks["small"]  # one CPU, one dtype: one measurement
    for section in report["backends"].values():
        for row in section["batches"].values():
            assert set(row["gmac_per_s"]) == set(row["ms_per_item"])
            assert all(0 < x <= peaks["vllm"]["gmac_per_s"] for x in row["gmac_per_s"].values())
