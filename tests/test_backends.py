"""The large-model backend seam: the registry (built-ins and examples/backend-plugin's `echo`, installed by pip,
offline), the one capability check (fastv, K > 0, cls refused in one line, exit 2, before any model loads), the
preset's `large.backend` / `large.vllm` validation, and a contract every backend keeps, run on transformers and on
echo: batch equals batch 1, the same image with two questions equals two runs, retain 1 keeps every token, the
kept set is what the large model answers from. Run, the CLI and resume are tested on echo, record by record."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine import backends
from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze, make_images, write_jsonl, write_preset

runner = CliRunner()


@pytest.fixture
def items(tmp_path):
    imgs = make_images(tmp_path)  # three sizes
    rows = [{"image": p.name, "question": q, "answer": "red", "id": f"q{i}"}
            for i, (p, q) in enumerate(zip(imgs, ["What color is the square?", "How many circles?", "What shape?"]))]
    rows.append({"image": imgs[0].name, "question": "Is it round?", "answer": "no", "id": "q3"})  # same image again
    return write_jsonl(tmp_path / "batch.jsonl", rows)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: refusals come before it."""
    from sgl_cli.engine.backends import transformers as hf_backend

    monkeypatch.setattr(hf_backend, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    monkeypatch.setattr(hf_backend.TransformersLarge, "load", classmethod(lambda *a, **k: pytest.fail("loaded")))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_ms(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("ms", "input_sha")} for r in recs]


# -- the registry ------------------------------------------------------------------------------------------------
def test_the_plugin_is_registered_after_the_built_ins(echo):
    assert backends.backend_names() == ["transformers", "vllm", "echo"]
    cls = backends.backend_class("echo")
    assert cls.__module__ == "sgl_echo_backend" and cls.name == "echo" and cls.offers == frozenset()
    assert backends.backend_class("transformers").offers == {"large_features", "vision_attention", "lm_attention",
                                                               "prune_inside_lm", "reduced_input"}


def test_an_unknown_backend_is_one_line_exit_2(echo, items, preset_file, no_model_loads):
    res = runner.invoke(app, ["run", str(items), "-p", str(preset_file), "--large-backend", "nope", "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == ("sgl: error: --large-backend: unknown large backend 'nope'; choose one of "
                                  "transformers, vllm, echo")


# -- the capability check ----------------------------------------------------------------------------------------
def test_check_names_the_guide_the_backend_and_what_is_missing():
    from sgl_cli.engine.backends.base import CapabilityError, LargeBackend, check
    from sgl_cli.engine.guides import guide_class

    class Bare(LargeBackend):
        name = "bare"

    for guide, k, what in (("cls", 0, "vision_attention"), ("fastv", 0, "lm_attention, prune_inside_lm"),
                           ("sgl", 2, "prune_inside_lm"), ("random", 1, "prune_inside_lm")):
        with pytest.raises(CapabilityError) as exc:
            check(guide_class(guide), Bare, k)
        at = f" at prune_layer {k}" if k else ""
        assert str(exc.value) == f"the {guide} guide{at} needs {what}, which the bare large backend " \
                                 "(large_backend) does not offer"
        assert exc.value.setting == "large_backend"
    check(guide_class("sgl"), Bare, 0)
    check(guide_class("random"), Bare, 0)
    for guide in ("sgl", "cls", "fastv", "random"):
        check(guide_class(guide), backends.backend_class("transformers"), 3)


@pytest.mark.parametrize("args, what", [
    (["--guide", "cls"], "the cls guide needs vision_attention"),
    (["--guide", "fastv"], "the fastv guide needs lm_attention, prune_inside_lm"),
    (["--prune-layer", "1"], "the sgl guide at prune_layer 1 needs prune_inside_lm"),
])
def test_refusals_are_one_line_exit_2_before_any_model_loads(echo, items, preset_file, no_model_loads, monkeypatch,
                                                             args, what):
    cls = backends.backend_class("echo")
    monkeypatch.setattr(cls, "load", classmethod(lambda *a, **k: pytest.fail("the echo backend loaded")))
    for command in (["run", str(items), "-o", str(items.with_name("o.jsonl"))], ["eval", str(items)],
                    ["calibrate", str(items), "--exit-rate", "0.5", "-o", str(items.with_name("c.yaml"))]):
        if command[0] == "calibrate" and "--guide" in args:
            continue  # calibrate runs the sgl guide
        res = runner.invoke(app, [*command, "-p", str(preset_file), "--large-backend", "echo", *args, "-q"])
        assert res.exit_code == 2, (command, res.output)
        lines = res.output.strip().splitlines()
        assert lines == [f"sgl: error: {what}, which the echo large backend (--large-backend) does not offer"], \
            (command, res.output)
    assert not items.with_name("o.jsonl").exists()


def test_inspect_refuses_a_guide_the_backend_lacks_and_all_skips_it(echo, tmp_path, tiny_pair, no_model_loads):
    (img,) = make_images(tmp_path, sizes=((224, 224),))
    preset = write_preset(tmp_path, tiny_pair, large={"model": str(tiny_pair["large"]), "dtype": "float32",
                                                      "backend": "echo"})
    res = runner.invoke(app, ["inspect", str(img), "--question", "what?", "--guide", "cls", "-p", str(preset)])
    assert res.exit_code == 2
    assert res.output.strip() == ("sgl: error: the cls guide needs vision_attention, which the echo large backend "
                                  "(--large-backend) does not offer")


# -- presets -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("large, small, message", [
    ({"backend": "vllm", "vllm": {"tensor_parallel": 2}}, None,
     "large.options: unknown option 'tensor_parallel' of the vllm large backend (did you mean "
     "'tensor_parallel_size'?); it takes: tensor_parallel_size, gpu_memory_utilization, max_model_len, max_num_seqs, "
     "enforce_eager, dtype, seed, enable_prefix_caching, load_format"),
    ({"backend": "vllm", "options": {"gpu_memory_utilization": 1.5}}, None,
     "large.options.gpu_memory_utilization: must be a fraction in (0, 1], got 1.5"),
    ({"backend": "vllm", "vllm": {"enforce_eager": "yes"}}, None, "large.options.enforce_eager: must be true or false"),
    ({"vllm": {"max_num_seqs": 4}}, None, "large.vllm: vLLM options apply with backend: vllm, not 'transformers'"),
    ({"backend": "vllm", "vllm": {}, "options": {}}, None, "large: give options or vllm (its alias), not both"),
    ({"backend": ""}, None, "large.backend: must name a backend"),
    ({"options": {"max_num_seqs": 4}}, None, "large.options: unknown option 'max_num_seqs' of the transformers large "
                                             "backend; it takes: none"),
    ({}, {"backend": "vllm"}, "small.backend: unknown small backend 'vllm'; choose one of transformers"),
])
def test_preset_backend_keys_are_validated(tmp_path, tiny_pair, large, small, message):
    """Every key of a preset's models, its backends' options (`vllm:` an alias of `options:`) among them, is checked
    before any model loads (`check_preset`, which every command calls first), naming the file."""
    from sgl_cli.engine.backends import check_preset
    from sgl_cli.engine.errors import SglError
    from sgl_cli.engine.preset import load_preset

    path = write_preset(tmp_path, tiny_pair, large={"model": str(tiny_pair["large"]), **large},
                        small={"model": str(tiny_pair["small"]), **(small or {})})
    with pytest.raises(SglError) as exc:
        check_preset(load_preset(str(path)))
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_preset_vllm_options_parse_and_the_flag_overrides(tmp_path, tiny_pair):
    from sgl_cli.engine.preset import load_preset

    opts = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 4096, "enforce_eager": True}
    p = load_preset(str(write_preset(tmp_path, tiny_pair, large={"model": str(tiny_pair["large"]), "backend": "vllm",
                                                                 "vllm": opts})))
    assert p.large.backend == "vllm" and p.large.options == opts and p.small.backend == "transformers"
    t = p.with_large_backend("transformers")
    assert t.large.backend == "transformers" and t.large.options is None and t.large.model == p.large.model
    assert p.with_large_backend(None) is p and t.with_large_backend("vllm").large.options is None
    # --large-option: over the preset's own
    o = p.with_large_backend(None, {"max_num_seqs": 8, "enforce_eager": False})
    assert o.large.options == {**opts, "max_num_seqs": 8, "enforce_eager": False} and p.large.options == opts


# -- the contract, on every backend ------------------------------------------------------------------------------
@pytest.fixture(params=["transformers", "echo"])
def engine_on(request, echo, tiny_pair):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import ModelSpec, Preset, Settings

    def make(**settings):
        base = dict(threshold=None, max_new_tokens=6, prompt_suffix="Answer with one word.", retain=0.25)
        base.update(settings)
        preset = Preset("t", ModelSpec(str(tiny_pair["small"]), dtype="float32"),
                        ModelSpec(str(tiny_pair["large"]), dtype="float32", backend=request.param), Settings(**base))
        return Engine.load(preset)

    make.backend = request.param
    return make


def test_records_carry_the_large_backend(engine_on, items):
    recs = list(engine_on().run(read_items(items)))
    assert [r["large_backend"] for r in recs] == [engine_on.backend] * 4
    assert all(r["error"] is None and r["exit"] == "large" for r in recs)


SCORES = ("exit_score", "confidence", "consistency")  # floats: padding in a batch moves their last bits


def same_records(a: list[dict], b: list[dict]) -> None:
    assert [{k: v for k, v in r.items() if k not in SCORES} for r in without_ms(a)] == \
        [{k: v for k, v in r.items() if k not in SCORES} for r in without_ms(b)]
    for x, y in zip(a, b):
        for k in SCORES:
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-6), k


def test_batch_equals_batch_one(engine_on, items):
    one = list(engine_on(batch_size=1).run(read_items(items)))
    four = list(engine_on(batch_size=4).run(read_items(items)))
    same_records(four, one)
    assert [r["id"] for r in one] == ["q0", "q1", "q2", "q3"]


def test_same_image_two_questions_equal_their_separate_runs(engine_on, items):
    eng = engine_on(batch_size=4)
    together = list(eng.run(read_items(items)))
    alone = [eng.process([it])[0] for it in read_items(items)]
    same_records(together, alone)
    assert together[0]["visual_tokens"] == together[3]["visual_tokens"]  # q0 and q3: one image


def test_the_kept_set_is_what_the_large_model_answers_from(engine_on, items):
    """The sgl guide's kept set is the top `retain` of the small model's importance (independent reference), and
    the backend's answer from it equals its answer from exactly those indices given by hand; at retain 1 every
    token is kept and the answer is the unpruned one."""
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order

    for retain in (0.25, 1.0):
        eng = engine_on(retain=retain, max_new_tokens=40)
        works = analyze(eng, list(read_items(items)))
        inputs = eng.large_inputs(works)
        answers = eng.large_pass(works, inputs)
        for w, a in zip(works, answers):
            imp = w.small.importance
            ref = top_k_in_order(imp, n_keep(len(imp), retain))
            assert torch.equal(a.kept, ref)
            if retain == 1.0:
                assert len(a.kept) == w.encoded.n_visual
        by_hand = eng.large.generate(works, inputs, [top_k_in_order(w.small.importance, n_keep(
            len(w.small.importance), retain)) for w in works], 0, [40] * len(works))
        assert [a.tokens for a in answers] == by_hand.tokens
        if engine_on.backend == "echo":  # echo's answer is its kept set, spelled out
            assert [a.answer for a in answers] == [
                f"kept {len(a.kept)} of {w.encoded.n_visual}: " + ",".join(str(int(i)) for i in a.kept[:4])
                for w, a in zip(works, answers)]
        if engine_on.backend == "transformers" and retain == 1.0:  # the unpruned model's greedy answer
            from sgl_cli.engine.core.generate import collate, greedy, rows_device

            m = eng.large
            full = greedy(m.model, collate(inputs.rows, m.pad_id, rows_device(m.model)), [40] * len(works),
                          m.eos_ids, m.pad_id)
            assert by_hand.tokens == full.tokens


# -- Run, the CLI and resume on echo -----------------------------------------------------------------------------
def test_sgl_run_on_echo_record_by_record(echo, items, tiny_pair):
    preset_file = write_preset(items.parent, tiny_pair, max_new_tokens=40)
    out = items.with_name("echo.jsonl")
    res = runner.invoke(app, ["run", str(items), "-p", str(preset_file), "--large-backend", "echo", "--retain",
                              "0.25", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    recs = records(out)
    assert [r["id"] for r in recs] == ["q0", "q1", "q2", "q3"]
    for r in recs:
        assert r["large_backend"] == "echo" and r["exit"] == "large" and r["error"] is None
        assert r["retained_tokens"] == max(1, int(r["visual_tokens"] * 0.25 + 1e-9))
        assert r["answer"].startswith(f"kept {r['retained_tokens']} of {r['visual_tokens']}: ")
        assert r["finish_reason"] == "stop" and r["usage"]["completion_tokens"] > len("kept 16 of 64: ")
    saved = (out.with_name("echo.preset.yaml")).read_text()
    assert "backend: echo" in saved


def test_sgl_run_on_echo_resumes_without_duplicates(echo, items, preset_file):
    out = items.with_name("echo.jsonl")
    args = ["run", str(items), "-p", str(preset_file), "--large-backend", "echo", "-o", str(out), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    full = records(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # interrupted after two records
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert without_ms(records(out)) == without_ms(full)
    # Resuming on another large backend would mix two backends' answers in one file.
    out.write_text("".join(lines[:2]))
    res = runner.invoke(app, ["run", str(items), "-p", str(preset_file), "-o", str(out), "-q", "--resume"])
    assert res.exit_code == 2 and "cannot resume: settings differ" in res.output and "large" in res.output


# -- the vLLM backend's refusals (here: without vLLM, or with vLLM hidden) ---------------------------------------
def test_vllm_not_installed_is_one_line_exit_2_before_any_model_loads(items, preset_file, no_model_loads,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as where it is not installed
    res = runner.invoke(app, ["run", str(items), "-p", str(preset_file), "--large-backend", "vllm", "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == ("sgl: error: the vLLM backend needs vLLM, which is not installed: pip install "
                                  "'sgl-cli[vllm]' on a GPU machine, or scripts/vllm_env.sh DIR on a CPU")


def test_vllm_refuses_an_unsupported_family_before_any_model_loads(items, tmp_path, tiny_pair, no_model_loads):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    preset = write_preset(tmp_path, tiny_pair, large={"model": str(llava), "backend": "vllm"})
    res = runner.invoke(app, ["run", str(items), "-p", str(preset), "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == (f"sgl: error: {llava}: the vLLM backend runs Qwen2-VL, Qwen2.5-VL, Qwen3-VL models, "
                                  "not llava (use the transformers backend)")


@pytest.mark.parametrize("args, what", [
    (["--guide", "cls"], "the cls guide needs vision_attention"),
    (["--guide", "fastv"], "the fastv guide needs lm_attention, prune_inside_lm"),
    (["--prune-layer", "2"], "the sgl guide at prune_layer 2 needs prune_inside_lm")])
def test_vllm_refuses_what_it_does_not_offer(items, preset_file, no_model_loads, args, what):
    res = runner.invoke(app, ["run", str(items), "-p", str(preset_file), "--large-backend", "vllm", *args, "-q"])
    assert res.exit_code == 2
    assert res.output.strip() == f"sgl: error: {what}, which the vllm large backend (--large-backend) does not offer"


def test_a_ray_worker_asks_for_its_vllm_tensor_parallel_gpus(tmp_path, tiny_pair):
    """With --backend ray each worker holds one vLLM engine: on a cluster with GPUs it asks for
    tensor_parallel_size of them (without --gpus-per-worker); on transformers, one."""
    from sgl_cli.engine.preset import load_preset
    from sgl_cli.engine.runs import ray_backend

    vllm = load_preset(str(write_preset(tmp_path, tiny_pair, large={"model": str(tiny_pair["large"]),
                                                                    "backend": "vllm",
                                                                    "vllm": {"tensor_parallel_size": 4}})))
    assert ray_backend.worker_gpus(vllm) == 4.0
    assert ray_backend.worker_gpus(vllm.with_large_backend("transformers")) == 1.0
    fake = type("Ray", (), {"cluster_resources": staticmethod(lambda: {"GPU": 8.0, "CPU": 16.0})})
    assert ray_backend._plan(fake, ray_backend.RayOptions(), 10, lambda _: None, 4.0) == (2, 4.0, 1)
    cpu_only = type("Ray", (), {"cluster_resources": staticmethod(lambda: {"CPU": 16.0})})
    assert ray_backend._plan(cpu_only, ray_backend.RayOptions(), 10, lambda _: None, 4.0) == (1, 0.0, 1)


def test_bench_measures_a_preset_on_its_own_large_backend(tmp_path, tiny_pair, no_model_loads):
    """A preset on vllm is measured on vllm (no longer refused): where vLLM is not installed, that is one line
    before any model loads."""
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests_vllm/test_bench.py runs bench on it)")
    preset = write_preset(tmp_path, tiny_pair, large={"model": str(tiny_pair["large"]), "backend": "vllm"})
    res = runner.invoke(app, ["bench", "--preset", str(preset)])
    assert res.exit_code == 2
    assert res.output.strip() == ("sgl: error: the vLLM backend needs vLLM, which is not installed: pip install "
                                  "'sgl-cli[vllm]' on a GPU machine, or scripts/vllm_env.sh DIR on a CPU")


def test_bench_measures_two_large_backends_side_by_side(echo):
    """`sgl bench --large-backend transformers,echo`: any registered backend through the seam, in the same rounds.
    echo answers `kept N of M`: the pipeline's large answers on it name the small model's top `retain` of the
    visual tokens, its unpruned stage keeps all of them; it has no vision tower to time."""
    res = runner.invoke(app, ["bench", "--size", "tiny", "--items", "4", "--batch-sizes", "1,2", "--repeats", "1",
                              "--max-new-tokens", "24", "--retain", "0.25", "--large-backend", "transformers,echo",
                              "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["large_backends"] == ["transformers", "echo"] and list(r["backends"]) == ["transformers", "echo"]
    t, e = r["backends"]["transformers"], r["backends"]["echo"]
    assert r["batches"] == t["batches"] and e["device"] == "echo" and not e["vision_stage"]
    for b in ("1", "2"):
        assert set(t["batches"][b]["ms_per_item"]) == {"small", "small_capture", "small_stage", "vision", "large",
                                                       "pruned_k0", "pipeline", "pipeline_serial"}
        assert set(e["batches"][b]["ms_per_item"]) == {"small", "small_capture", "small_stage", "large", "pruned_k0",
                                                       "pipeline", "pipeline_serial"}
        assert e["batches"][b]["identical_to_batch_1"] and "lm_speedup_k0" not in e["batches"][b]["ratios"]
        assert set(r["cross_backend"]["echo_over_transformers"]["items_per_s"][b]) == {"large", "pruned_k0",
                                                                                       "pipeline", "pipeline_serial"}
    kept, visual = r["retained_tokens"], r["visual_tokens"]
    answers = [a for a, exit in e["pipeline_answers"] if exit == "large"]
    assert len(answers) == 2 and all(a.startswith(f"kept {kept} of {visual}:") for a in answers)
    # The same exits on both: the small model's pass and the threshold are shared.
    assert [x for _, x in e["pipeline_answers"]] == [x for _, x in t["pipeline_answers"]]
    assert not r["cross_backend"]["echo_over_transformers"]["same_pipeline_answers"]
    # echo runs no model and does not say where it computes: its claims are stated, not held to a device's peak.
    assert e["matmul_peak"] is None and t["matmul_peak"]["device"] == "cpu" and e["engine_options"] == {}
    assert set(e["batches"]["1"]["gmac_per_s"]) == set(e["batches"]["1"]["ms_per_item"])
