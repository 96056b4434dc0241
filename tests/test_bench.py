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

STAGES = {"small", "small_capture", "vision", "large", "pipeline"}


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


def test_bench_tiny_pair_report():
    res = CliRunner().invoke(app, ["bench", "--size", "tiny", "--items", "2", "--repeats", "1", "--json",
                                   "--batch-sizes", "1,2", "--max-new-tokens", "3", "--retain", "0.25"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
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
    (["--vllm", "max_num_seqs=4"], "--vllm: vLLM's options apply with --large-backend vllm"),
    (["--large-backend", "vllm", "--vllm", "max_num_seq=4"], "--vllm: unknown key 'max_num_seq' (did you mean "),
    (["--large-backend", "vllm", "--vllm", "max_num_seqs=0"], "--vllm.max_num_seqs: must be an integer >= 1"),
    (["--large-backend", "vllm", "--vllm", "enforce_eager"], "--vllm: give KEY=VALUE pairs"),
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
