"""`sgl bench`: the FLOPs model by hand, the forced exit threshold, the decode loop's one transfer per step, and
the JSON report's structure and identities (never its timings) on a published architecture cut to two layers and
on the tiny built-in pair."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.builtin import arch
from sgl_cli.engine.evaluation.bench_report import forced_threshold, lm_macs

STAGES = {"small", "small_capture", "small_stage", "vision", "large", "pipeline", "pipeline_serial"}


def _config(**kw):
    cfg = types.SimpleNamespace(**kw)
    return types.SimpleNamespace(config=types.SimpleNamespace(get_text_config=lambda: cfg))


def test_lm_macs_by_hand():
    model = _config(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=10)
    # per token per layer: 2*8*8 + 2*8*4 + 3*8*16 = 128 + 64 + 384 = 576
    # prefill n=3: 2 layers * (3*576 + 9*8) + 8*10 = 2*(1728 + 72) + 80 = 3680
    # decode t=0: 2 * (576 + 2*3*8) + 80 = 2*624 + 80 = 1328; t=1: 2 * (576 + 2*4*8) + 80 = 2*640 + 80 = 1360
    assert lm_macs(model, 3, 0) == 3680
    assert lm_macs(model, 3, 2) == 3680 + 1328 + 1360


def test_forced_threshold_exits_exactly_that_fraction():
    scores = [0.9, 0.1, 0.5, 0.7, 0.3, 0.8]
    for rate, exits in ((0.5, 3), (0.0, 0), (1.0, 6), (0.34, 2)):
        t = forced_threshold(scores, rate)
        assert sum(s >= t for s in scores) == exits if t is not None else exits == 0
    assert forced_threshold(scores, 0.5) == pytest.approx((0.7 + 0.5) / 2)


@dataclass
class _Out:
    logits: torch.Tensor
    cache: object = None


class _Scripted(torch.nn.Module):
    """A model whose logits at step s make row i emit token 10 * s + i + 3 (EOS 2 for row 0 at step 1)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.emb = torch.nn.Embedding(64, 4)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, mm_encoder_outputs=None, cache=None,
                use_cache=True, logits_to_keep=1):
        b = input_ids.shape[0]
        logits = torch.zeros(b, 1, 64)
        for i in range(b):
            logits[i, 0, 2 if (i == 0 and self.step == 1) else 10 * self.step + i + 3] = 5.0 + i
        self.step += 1
        return _Out(logits, cache)


def test_greedy_reads_back_once_per_step(monkeypatch):
    from sgl_cli.engine.core import generate

    model = _Scripted()
    batch = generate.Batch(torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long),
                           torch.arange(4).repeat(1, 3, 1), torch.zeros(0, 4))
    calls = {"cpu": 0, "int": 0, "item": 0}
    for name, attr in (("cpu", "cpu"), ("int", "__int__"), ("item", "item")):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _name=name, **k):
            calls[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    gen = generate.greedy(model, batch, [3, 2, 3], {2}, pad_id=0)
    monkeypatch.undo()
    assert gen.tokens == [[3, 2], [4, 14], [5, 15, 25]]
    p = torch.softmax(torch.tensor([0.0] * 63 + [5.0]), 0)[-1].item()
    assert gen.probs[0] == [p, p]
    assert calls == {"cpu": 3, "int": 0, "item": 0}  # three steps, one transfer each, no per-row reads


def _hand_vision_macs(v: arch.VisionSpec, out: int, grid: int) -> float:
    """One Qwen2.5-VL block attending over the whole grid (a cut tower keeps its last block global)."""
    n, d, m = grid * grid, v.hidden, v.mlp
    conv = n * 3 * 2 * v.patch * v.patch * d
    block = n * (3 * d * d + d * d + 3 * d * m) + 2 * n * n * d
    merged = d * v.merge ** 2
    merger = n // v.merge ** 2 * (merged * merged + merged * out)
    return conv + block + merger


@pytest.fixture(scope="module")
def arch_report(tmp_path_factory):
    prof = tmp_path_factory.mktemp("prof")
    res = CliRunner().invoke(app, ["bench", "--arch", "qwen2.5-vl-3b-7b", "--layers", "2", "--vision-layers", "1",
                                   "--image-size", "56", "--batch-sizes", "1,2", "--repeats", "1", "--max-new-tokens",
                                   "2", "--prune-layer", "1", "--retain", "0.5", "--json", "--profile", str(prof)])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout), prof


def test_arch_report_structure(arch_report):
    r, _ = arch_report
    assert r["arch"] == "qwen2.5-vl-3b-7b" and r["device"].startswith("cpu") and r["dtype"] == "float32"
    assert r["models"]["large"]["built_text_layers"] == 2 and r["models"]["large"]["published_params_b"] == 8.29
    assert r["image_size"] == [56, 56] and r["visual_tokens"] == 4 and r["retained_tokens"] == 2
    assert r["prune_layers"] == [0, 1] and r["items"] == 2 and r["exit_rate_target"] == 0.5
    assert set(r["batches"]) == {"1", "2"}
    for row in r["batches"].values():
        assert set(row["ms_per_item"]) == STAGES | {"pruned_k0", "pruned_k1"}
        assert all(v > 0 for v in row["items_per_s"].values()) and all(v > 0 for v in row["peak_memory_mb"].values())
        assert row["exit_rate"] == 0.5 and row["identical_to_batch_1"]
        for stage, ms in row["ms_per_item"].items():
            assert row["items_per_s"][stage] == pytest.approx(1000 / ms, rel=1e-3)
    assert [t["figure"] for t in r["targets"]] == ["large_stage_speedup", "pipeline_speedup", "capture_overhead",
                                                    "batch_speedup"]
    assert all(t["batch"] == 2 for t in r["targets"])
    assert r["batches"]["1"]["ratios"]["batch_speedup"] == 1.0


def test_arch_report_streaming_figures(arch_report):
    """The streaming pipeline beside the serial one (each on items of its own), the pace of its slower stage alone
    (overlap efficiency), each stage's busy share, and the small stage's MAC rate over the large model alone's."""
    r, _ = arch_report
    for b, row in r["batches"].items():
        t, x = row["ms_per_item"], row["ratios"]
        assert x["streaming_speedup"] == pytest.approx(t["pipeline_serial"] / t["pipeline"], rel=1e-3)
        floor = max(t["small_stage"], (1 - row["exit_rate"]) * t["pruned_k0"])
        assert x["overlap_efficiency"] == pytest.approx(floor / t["pipeline"], rel=1e-3)
        busy = row["pipeline_busy"]
        assert 0 < busy["small"] <= 1 and 0 < busy["large"] <= 1 and busy["in_flight_max"] >= 1
        rate = row["gmac_per_s"]
        assert x["small_mac_rate_ratio"] == pytest.approx(rate["small_stage"] / rate["large"], rel=1e-3)
        small = r["flops"]["vision_small"] + r["flops"]["lm_small"] + r["flops"]["reread"]
        assert rate["small_stage"] == pytest.approx(small * 1000 / t["small_stage"], rel=1e-2)


def test_arch_report_flops_by_hand(arch_report):
    r, _ = arch_report
    f = r["flops"]
    s, l = arch.QWEN25_VL_3B, arch.QWEN25_VL_7B
    n, new, kept = r["prompt_tokens"], r["max_new_tokens"], r["retained_tokens"]
    text = n - r["visual_tokens"]

    def lm(spec, tokens, steps):
        t = spec.text
        return lm_macs(_config(hidden_size=t.hidden, intermediate_size=t.mlp, num_hidden_layers=2,
                               num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, vocab_size=t.vocab),
                       tokens, steps) / 1e9

    assert f["vision_large"] == pytest.approx(_hand_vision_macs(l.vision, l.text.hidden, 4) / 1e9, rel=1e-6)
    assert f["vision_small"] == pytest.approx(_hand_vision_macs(s.vision, s.text.hidden, 4) / 1e9, rel=1e-6)
    assert f["lm_large"] == pytest.approx(lm(l, n, new), rel=1e-6)  # random weights: no early EOS
    assert f["lm_pruned_k0"] == pytest.approx(lm(l, text + kept, new), rel=1e-6)
    assert f["lm_pruned_k1"] == pytest.approx((lm(l, n, new) + lm(l, text + kept, new)) / 2, rel=1e-6)
    assert f["large"] == pytest.approx(f["vision_large"] + f["lm_large"], abs=2e-6)
    for k in (0, 1):
        assert f[f"pruned_k{k}"] == pytest.approx(f["vision_large"] + f[f"lm_pruned_k{k}"], abs=2e-6)
    # reread: the prompt's text, the top 5% of the visual tokens (at least 1) and the answer but its last token
    assert f["reread"] == pytest.approx(lm(s, text + 1 + new - 1, 0), rel=1e-6)
    small = f["vision_small"] + f["lm_small"] + f["reread"]
    assert f["pipeline"] == pytest.approx(small + 0.5 * f["pruned_k1"], abs=4e-6)  # the pipeline prunes at K
    for row in r["batches"].values():
        x = row["ratios"]
        assert x["large_stage_speedup_k0_flops"] == pytest.approx(f["large"] / f["pruned_k0"], abs=1e-4)
        assert x["lm_speedup_k1_flops"] == pytest.approx(f["lm_large"] / f["lm_pruned_k1"], abs=1e-4)
        assert x["pipeline_speedup_flops"] == pytest.approx(f["large"] / f["pipeline"], abs=1e-4)


def test_arch_profile_on_cpu(arch_report):
    r, prof = arch_report
    summary = json.loads((prof / "summary.json").read_text())
    assert summary == r["profile"]
    assert summary["batch_size"] == 2 and summary["items"] == 2 and summary["wall_ms"] > 0
    assert summary["gpu_idle_fraction"] is None and "top_cuda_ops" not in summary
    assert (prof / "cpu_ops.txt").read_text().count("aten::") > 5 and not (prof / "cuda_ops.txt").exists()
    assert not (prof / "trace.json").exists()


TINY = ["bench", "--size", "tiny", "--items", "2", "--repeats", "1", "--batch-sizes", "1,2", "--max-new-tokens", "3",
        "--retain", "0.25"]


@pytest.fixture(scope="module")
def tiny_report():
    res = CliRunner().invoke(app, [*TINY, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_bench_tiny_pair_report(tiny_report):
    r = tiny_report
    assert r["size"] == "tiny" and r["prune_layers"] == [0]
    assert r["retained_tokens"] == max(1, int(0.25 * r["visual_tokens"]))
    x = r["batches"]["2"]["ratios"]
    assert x["large_stage_speedup_k0_flops"] > 1.2  # a quarter of the visual tokens
    # One backend: its section is the top-level figures, and there is nothing to compare it with.
    assert r["large_backends"] == ["transformers"] and list(r["backends"]) == ["transformers"]
    section = r["backends"]["transformers"]
    assert section["batches"] == r["batches"] and section["flops"] == r["flops"] and section["targets"] == r["targets"]
    assert section["vision_stage"] and "cross_backend" not in r
    assert section["tokens_generated"] == {"large": 3, "pruned_k0": 3, "pipeline": 3}  # random weights: no early EOS


@pytest.mark.parametrize("args,message", [
    (["--arch", "qwen9"], "unknown --arch 'qwen9'; one of qwen2.5-vl-3b-7b"),
    (["--arch", "internvl3-1b-8b", "--visual-tokens", "1000"], "--visual-tokens: OpenGVLab/InternVL3-1B-hf gives 256"),
    (["--batch-sizes", "1,x"], "--batch-sizes: give positive integers"),
    (["--arch", "qwen2.5-vl-7b-72b"], "needs "),
])
def test_bench_errors_are_one_line(args, message):
    res = CliRunner().invoke(app, ["bench", *args])
    assert res.exit_code == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bench_refuses_a_quantization_it_would_not_apply():
    from sgl_cli.engine import Bench, SglError

    with pytest.raises(SglError, match="--quantize: 'foo' is not one of none, nf4, 4bit, 8bit"):
        Bench(arch="qwen2.5-vl-3b-7b", quantize="foo")
    with pytest.raises(SglError, match="--quantize applies to --arch or --preset"):
        Bench(size="tiny", quantize="4bit")
    assert Bench(arch="qwen2.5-vl-3b-7b", quantize="4bit").quantize == "4bit"


def _no_model_loads(monkeypatch):
    """Every way bench builds or loads a model fails the test."""
    from sgl_cli.engine.backends import transformers
    from sgl_cli.engine.builtin import pair

    def refuse(*a, **k):
        raise AssertionError("a model was built or loaded before the refusal")

    for module, name in ((transformers, "load_model"), (transformers, "from_arch"), (pair, "build_pair")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("where", [["--size", "tiny"], ["--arch", "qwen2.5-vl-3b-7b"], ["--preset", "default"]])
@pytest.mark.parametrize("backends", ["vllm", "transformers,vllm"])
def test_bench_refuses_vllm_where_it_is_not_installed(monkeypatch, where, backends):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests_vllm/test_bench.py runs it)")
    _no_model_loads(monkeypatch)
    res = CliRunner().invoke(app, ["bench", *where, "--large-backend", backends])
    assert res.exit_code == 2, res.output
    assert "the vLLM backend needs vLLM, which is not installed" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stdout == ""


@pytest.mark.parametrize("args,message", [
    (["--large-backend", "foo"], "--large-backend: unknown large backend 'foo'; choose one of transformers, vllm"),
    (["--large-backend", "transformers,foo"], "--large-backend: unknown large backend 'foo'; choose one of "),
    (["--large-backend", ","], "--large-backend: name one or more large backends"),
    (["--large-backend", "vllm", "--prune-layer", "1"],
     "the sgl guide at prune_layer 1 needs prune_inside_lm, which the vllm large backend (--large-backend) does not"),
    (["--vllm", "max_num_seqs=4"], "--vllm: vllm's options apply with --large-backend vllm"),
    (["--large-backend", "vllm", "--vllm", "max_num_seq=4"], "--vllm: unknown option 'max_num_seq' of the vllm large "
                                                             "backend (did you mean "),
    (["--large-backend", "vllm", "--large-option", "max_num_seq=4"], "--large-option max_num_seq: none of the large "
                                                                     "backends measured (vllm) takes it"),
    (["--large-backend", "vllm", "--vllm", "max_num_seqs=0"], "--vllm.max_num_seqs: must be an integer >= 1"),
    (["--large-backend", "vllm", "--vllm", "enforce_eager"], "--vllm: give KEY=VALUE (e.g. max_num_seqs=8)"),
    (["--large-backend", "vllm", "--vllm", "enable_prefix_caching=1"],
     "--vllm.enable_prefix_caching: must be true or false, got 1"),
    (["--arch", "qwen2.5-vl-3b-7b", "--large-backend", "transformers,vllm", "--quantize", "4bit"],
     "--quantize applies to the transformers large backend (bitsandbytes weights), not to vllm"),
])
def test_bench_backend_errors_are_one_line(monkeypatch, args, message):
    _no_model_loads(monkeypatch)
    res = CliRunner().invoke(app, ["bench", "--size", "tiny", *args] if "--arch" not in args else ["bench", *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bench_vllm_options_parse_as_a_preset_writes_them():
    from sgl_cli.engine.evaluation.bench import parse_options

    assert parse_options("gpu_memory_utilization=0.3, enforce_eager=true,max_model_len=null,max_num_seqs=8,"
                         "dtype=float32") == {"gpu_memory_utilization": 0.3, "enforce_eager": True,
                                              "max_model_len": None, "max_num_seqs": 8, "dtype": "float32"}
    assert parse_options(None) is None


def test_vision_flops_from_the_config_equal_the_executed_count(tmp_path):
    """The vLLM backend holds no transformers model: its tower's FLOPs are counted on a copy built from the config
    (zero weights, the language model left on the meta device); they equal the count on the loaded model."""
    from sgl_cli.engine import Engine, read_items
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair
    from sgl_cli.engine.evaluation.bench import write_noise_items
    from sgl_cli.engine.evaluation.bench_report import config_vision_macs, vision_macs
    from sgl_cli.engine.preset import ModelSpec, Settings

    folder = build_pair(TINY_SPEC, tmp_path / "pair")["large"]
    large = load_model(ModelSpec(str(folder), dtype="float32"), "large")
    items = list(read_items(write_noise_items(tmp_path / "items", 1, (140, 112))))
    work = Engine(Settings(guide="random"), None, large).prepare(items)[0]
    config_only = types.SimpleNamespace(model=types.SimpleNamespace(config=large.model.config), family=large.family)
    executed = vision_macs(large, work.encoded.large)
    assert executed > 1e6
    assert config_vision_macs(config_only, work.encoded.large) == executed


# -- what ran, on what, and whether a figure is possible (issue 32) ------------------------------------------------
def test_the_report_states_each_engines_options(tiny_report):
    """The small model's and each large backend's engine options, as they ran: in the report and in each section."""
    r = tiny_report
    assert set(r["engine_options"]) == {"small", "transformers"}
    assert r["engine_options"]["transformers"] == r["backends"]["transformers"]["engine_options"]
    for options in r["engine_options"].values():
        assert options["engine"] == "transformers" and options["dtype"] == "float32" and options["device"] == "cpu"
        assert options["attn_implementation"] == "sdpa" and options["vision_attn_implementation"] == "sdpa"
        assert options["quantize"] is None and options["threads"] == torch.get_num_threads()
        assert options["transformers_version"] and options["torch_version"] == torch.__version__


def test_the_table_header_states_each_engines_options():
    res = CliRunner().invoke(app, TINY)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    for name in ("small", "transformers"):
        line = next(x for x in lines if x.startswith(f"{name} engine: "))
        assert "engine transformers" in line and "dtype float32" in line and "attn_implementation sdpa" in line
        assert f"threads {torch.get_num_threads()}" in line
    assert any(x.startswith("matmul peaks measured in this run (GMAC/s): small ") for x in lines)
    assert "every timed call on items no engine had seen: 22 items in all" in res.stdout


def test_every_claim_is_under_the_measured_matmul_peak(tiny_report):
    r = tiny_report
    peak = r["matmul_peaks"]["transformers"]
    assert peak == r["backends"]["transformers"]["matmul_peak"] == r["matmul_peaks"]["small"]
    assert (peak["device"], peak["dtype"], peak["parallel"]) == ("cpu", "float32", 1) and peak["gmac_per_s"] > 0.1
    f = r["flops"]
    for row in r["batches"].values():
        claims = row["gmac_per_s"]
        assert set(claims) == set(row["ms_per_item"])
        assert claims["large"] == pytest.approx(f["large"] * row["items_per_s"]["large"], rel=1e-2)
        assert claims["small"] == pytest.approx((f["vision_small"] + f["lm_small"]) * row["items_per_s"]["small"],
                                                rel=1e-2)
        assert claims["pipeline"] == pytest.approx(f["pipeline"] * row["items_per_s"]["pipeline"], rel=1e-2)
        assert all(0 < v <= peak["gmac_per_s"] for v in claims.values())


def test_a_stage_faster_than_the_device_can_compute_is_refused(monkeypatch):
    """A device whose measured peak is 1 MMAC/s: every stage of the run claims more, and the bench refuses to report
    them (the first it checks), in one line."""
    from sgl_cli.engine.evaluation import bench_report

    monkeypatch.setattr(bench_report, "matmul_peak", lambda device, dtype: 1e6, raising=False)
    res = CliRunner().invoke(app, [*TINY, "--json"])
    assert res.exit_code == 2, res.output
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("sgl: error: the small model's small stage at batch 1 claims ")
    assert (" ms), above the float32 matmul peak measured on cpu in this run, 0.0 GMAC/s: a cache served it or its "
            "FLOPs are miscounted; not reported") in res.stderr


def _section(ms: float) -> dict:
    return {"flops": {"vision_small": 1.0, "lm_small": 2.0, "vision_large": 3.0, "large": 40.0, "pruned_k0": 10.0,
                      "pipeline": 8.0},
            "matmul_peak": {"device": "cuda:0", "dtype": "bfloat16", "parallel": 2, "gmac_per_s": 1000.0},
            "batches": {"8": {"ms_per_item": {"small": 100.0, "large": ms, "pruned_k0": 50.0, "pipeline": 60.0}}}}


def test_check_claims_refuses_a_stage_timed_too_short():
    """The check on a report's figures: 40 GMAC per item in 40 ms is 1,000 GMAC/s, the peak of two 500 GMAC/s GPUs
    (vLLM's tensor parallelism): allowed; in 39 ms it is more than they can do."""
    from sgl_cli.engine.errors import SglError
    from sgl_cli.engine.evaluation.bench_report import check_claims

    small = {"device": "cuda:0", "dtype": "bfloat16", "parallel": 1, "gmac_per_s": 500.0}
    ok = _section(40.0)
    check_claims("vllm", ok, small)
    assert ok["batches"]["8"]["gmac_per_s"] == {"small": 30.0, "large": 1000.0, "pruned_k0": 200.0,
                                                "pipeline": 133.333}
    with pytest.raises(SglError) as err:
        check_claims("vllm", _section(39.0), small)
    assert str(err.value) == ("vllm's large stage at batch 8 claims 1025.6 GMAC/s (40.00 GMAC per item in 39.0 ms), "
                              "above the bfloat16 matmul peak measured on cuda:0 x2 in this run, 1000.0 GMAC/s: a "
                              "cache served it or its FLOPs are miscounted; not reported")
    slow_small = dict(small, gmac_per_s=20.0)  # the small model's stages are held to its own device's peak
    with pytest.raises(SglError, match="^the small model's small stage at batch 8 claims 30.0 GMAC/s"):
        check_claims("vllm", _section(40.0), slow_small)
    unknown = dict(_section(1.0), matmul_peak=None)  # a backend that does not say where it computes (a plugin)
    check_claims("remote", unknown, small)
    assert unknown["batches"]["8"]["gmac_per_s"]["large"] == 40000.0  # stated, not checked


def _recording(loaded):
    """A transformers large backend that records what each `generate` call is sent: (item id, kept indices)."""
    from sgl_cli.engine.backends.transformers import TransformersLarge

    class Recording(TransformersLarge):
        calls: list = []

        def generate(self, works, inputs, kept, k, limits):
            self.calls.append([(w.item.id, tuple(int(i) for i in idx)) for w, idx in zip(works, kept)])
            return super().generate(works, inputs, kept, k, limits)

    return Recording(loaded)


def test_no_timed_call_is_sent_an_item_it_was_sent_before(tmp_path):
    """What vLLM's caches key on (an image and its kept set) never repeats in the timed calls: every round and batch
    size takes new items, the pipeline other ones than the stages; only the untimed calls at the end (the FLOPs'
    generations and the batch-identity check) go back to the last round's first pipeline items."""
    from sgl_cli.engine import Bench, read_items
    from sgl_cli.engine.evaluation import bench_report
    from sgl_cli.engine.evaluation.bench import write_noise_items
    from sgl_cli.engine.pipeline.engine import Engine

    bench = Bench(size="tiny", max_new_tokens=2, retain=0.25)
    try:
        engine, items = bench.load(None, 2, max_batch=2)
        recording = _recording(engine.large.loaded)
        engine = Engine(engine.settings, engine.small, recording)
        # 2 rounds (a warm-up, a timed one) x (the stages' 1 + 2, each pipeline's (streaming, serial) 2 twice)
        n = 2 * (1 + 2 + 2 * 2 * 2)
        pool = list(read_items(write_noise_items(tmp_path, n, tuple(bench.described["image_size"]))))
        report = bench_report.run_bench(engine, pool, batch_sizes=(1, 2), repeats=1, exit_rate=0.5,
                                        larges={"transformers": recording})
    finally:
        bench.close()
    ids = [x.id for x in pool]
    # The pool in order, per round and batch size: b for the stages, then 2 for each pipeline (streaming, serial).
    reference = set(ids[12:14])  # round 2, batch 1: the streaming pipeline's items
    calls = recording.calls
    last_other = max(i for i, call in enumerate(calls) if any(x not in reference for x, _ in call))
    seen = set()
    for i, call in enumerate(calls[:last_other + 1]):
        assert not seen & set(call), f"call {i} repeats {sorted(seen & set(call))}"
        seen |= set(call)
    assert {x for call in calls[last_other + 1:] for x, _ in call} <= reference  # the untimed ones
    stages = {ids[0], *ids[5:7], ids[11], *ids[16:18]}
    sent = {x for call in calls for x, _ in call}
    assert stages <= sent and len(sent - stages) >= 8  # at least one item of each pipeline call reached it
    assert all({x for x, _ in call} <= stages or not {x for x, _ in call} & stages for call in calls)
    assert report["fresh_items"] == n == bench_report.pool_size((1, 2), 1, 2) and report["items"] == 2


def test_an_input_too_short_for_fresh_items_is_refused(tmp_path):
    from sgl_cli.engine.evaluation.bench import write_noise_items

    path = write_noise_items(tmp_path, 3, (56, 56))
    res = CliRunner().invoke(app, [*TINY, "--input", str(path)])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == ("sgl: error: 3 items: every timed call takes items no engine has seen, 22 in all (2 "
                                  "rounds x (1 + 2 for the stages + 2 for each pipeline, streaming and serial, at "
                                  "each of 2 batch sizes)); give more items, or fewer rounds, batch sizes or --items")


@pytest.mark.parametrize("given, want", [(None, False), ({"enable_prefix_caching": True}, True),
                                         ({"enable_prefix_caching": False}, False)])
def test_bench_runs_vllm_without_prefix_caching_unless_asked(monkeypatch, given, want):
    """The options `Bench` gives the vLLM backend (vLLM stood in for: it is not installed here)."""
    from sgl_cli.engine import Bench
    from sgl_cli.engine.backends.vllm.backend import VllmBackend

    class Loaded(Exception):
        pass

    def load(cls, spec, role="large", options=None):
        raise Loaded(options)

    for name, fn in (("check_installed", lambda cls: None), ("check_spec", lambda cls, spec: None), ("load", load)):
        monkeypatch.setattr(VllmBackend, name, classmethod(fn))
    with pytest.raises(Loaded) as got:
        Bench(size="tiny", large_backend="vllm",
              backend_options={} if given is None else {"vllm": given}).load(None, 2, max_batch=2)
    options = got.value.args[0]
    assert options["enable_prefix_caching"] is want and options["max_num_seqs"] == 2


def test_the_pipelines_bound_is_one_device_or_both():
    """The streaming pipeline runs both stages at once: on one device they share its peak, on two (a GPU each, or a
    GPU beside vLLM's) their peaks add up."""
    from sgl_cli.engine.evaluation.bench_figures import pipeline_peak

    cpu_a = {"device": "cpu", "dtype": "float32", "parallel": 1, "gmac_per_s": 100.0}
    cpu_b = {"device": "cpu", "dtype": "float32", "parallel": 1, "gmac_per_s": 80.0}
    gpu = {"device": "cuda:1", "dtype": "bfloat16", "parallel": 4, "gmac_per_s": 4000.0}
    assert pipeline_peak(cpu_a, cpu_b) is cpu_a
    both = pipeline_peak(cpu_a, gpu)
    assert both["gmac_per_s"] == 4100.0 and both["device"] == "cpu + cuda:1"
