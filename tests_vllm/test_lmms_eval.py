"""sgl as a model of lmms-eval (sgl_cli/integrations/lmms_eval.py), run as lmms-eval runs it: `python -m lmms_eval
--model sgl` in a subprocess, offline, on a task YAML of the tests' own over a local dataset folder (datasets'
save_to_disk, `dataset_kwargs: {load_from_disk: true}`) written from `sgl demo` items, found with `--include_path`.

One lmms-eval run answers three tasks: `sgl_shapes` (12 demo items), `sgl_shapes_broken` (the first 3, the second
with a doc_to_visual that fails) and `sgl_shapes_cmyk` (the first 3 as CMYK JPEGs, which the dataset decodes as CMYK
pictures). Its scores, records and per-task summary are compared with `sgl eval` and `sgl run` on the same items and
settings; the CMYK task also runs with the large model on vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENGINE, comparable

N = 12
SETTINGS = dict(retain=0.09, guide="sgl", threshold=0.9, batch_size=4)
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "disabled"}

TASK = """\
task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: {visual}
doc_to_text: question
doc_to_target: answer
{extra}generation_kwargs:
  max_new_tokens: 16
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

UTILS = """\
def first_three(dataset):
    return dataset.select(range(3))


def visual_failing_on_second(doc):
    if doc["id"].endswith("-1"):
        raise RuntimeError("this doc's image cannot be read")
    return [doc["image"]]
"""


CMYK = 3  # items of the CMYK task


def run(args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=OFFLINE, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:2]} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_args(demo: Path, **extra) -> str:
    args = {"preset": demo / "preset.yaml", **SETTINGS, **extra}
    return ",".join(f"{k}={v}" for k, v in args.items())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo items, their dataset folder, the task YAMLs, and one lmms-eval run over both tasks."""
    import datasets

    root = tmp_path_factory.mktemp("lmms")
    demo = root / "demo"
    run(["-m", "sgl_cli", "demo", str(demo), "--n", str(N), "--seed", "11"])
    items = jsonl(demo / "batch.jsonl")
    for x in items[3::4]:  # references no answer matches: both scores see right and wrong answers
        x["answer"] = f"not {x['answer']}"
    (demo / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    table = {"id": [x["id"] for x in items], "image": [str(demo / x["image"]) for x in items],
             "question": [x["question"] for x in items], "answer": [str(x["answer"]) for x in items]}
    ds = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "data"))
    _cmyk_items(demo, items[:CMYK], root / "data_cmyk")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "sgl_shapes.yaml").write_text(TASK.format(name="sgl_shapes", data=root / "data", visual="image",
                                                       extra=""))
    (tasks / "sgl_shapes_broken.yaml").write_text(TASK.format(
        name="sgl_shapes_broken", data=root / "data", visual="!function utils.visual_failing_on_second",
        extra="process_docs: !function utils.first_three\n"))
    (tasks / "sgl_shapes_cmyk.yaml").write_text(TASK.format(name="sgl_shapes_cmyk", data=root / "data_cmyk",
                                                            visual="image", extra=""))
    out = root / "out"
    records, summary = root / "lmms.records.jsonl", root / "lmms.summary.json"
    proc = run(["-m", "lmms_eval", "--model", "sgl",
                "--model_args", model_args(demo, records=records, summary=summary),
                "--tasks", "sgl_shapes,sgl_shapes_broken,sgl_shapes_cmyk", "--include_path", str(tasks),
                "--output_path", str(out), "--log_samples"])
    # lmms-eval logs an evaluation's failure and exits 0: its results file is the sign it finished.
    assert list(out.rglob("*_results.json")), proc.stderr[-4000:]
    return dict(root=root, demo=demo, tasks=tasks, out=out, records=records, summary=summary, proc=proc)


def _cmyk_items(demo: Path, items: list[dict], data: Path) -> None:
    """`items`' images as CMYK JPEGs in `demo` (cmyk.jsonl names them, for `sgl run`), and a dataset of them."""
    import datasets
    from PIL import Image

    rows = []
    for x in items:
        name = Path(x["image"]).stem + "-cmyk.jpg"
        with Image.open(demo / x["image"]) as im:
            im.convert("CMYK").save(demo / name, quality=95)
        rows.append({**x, "image": name})
    (demo / "cmyk.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    table = {"id": [x["id"] for x in rows], "image": [str(demo / x["image"]) for x in rows],
             "question": [x["question"] for x in rows], "answer": [str(x["answer"]) for x in rows]}
    ds = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    assert ds[0]["image"].mode == "CMYK"  # what doc_to_visual hands the model
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data))


def samples(out: Path, task: str) -> list[dict]:
    found = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    assert len(found) == 1, (task, [str(p) for p in out.rglob("*")])
    return sorted(jsonl(found[0]), key=lambda s: s["doc_id"])


def response(sample: dict) -> str:
    """The model's answer in a logged sample (after the task's filters: none here)."""
    resp = sample["filtered_resps"]
    return resp[0] if isinstance(resp, list) else resp


def results(out: Path) -> dict:
    found = sorted(out.rglob("*_results.json"))
    assert len(found) == 1, [str(p) for p in out.rglob("*")]
    return json.loads(found[0].read_text())


def sgl_run(setup, name: str, items: str = "batch.jsonl") -> list[dict]:
    out = setup["root"] / f"{name}.jsonl"
    if not out.exists():
        settings = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
        run(["-m", "sgl_cli", "run", str(setup["demo"] / items), "--preset", str(setup["demo"] / "preset.yaml"),
             *settings, "--out", str(out), "--quiet"])
    return jsonl(out)


def test_exact_match_equals_sgl_eval_item_by_item(setup):
    details = setup["root"] / "eval.details.jsonl"
    proc = run(["-m", "sgl_cli", "eval", str(setup["demo"] / "batch.jsonl"), "--preset",
                str(setup["demo"] / "preset.yaml"), "--guide", "sgl", "--retain", "0.09", "--threshold", "0.9",
                "--batch-size", "4", "--metric", "exact", "--details", str(details), "--json", "--quiet"])
    evaluated = json.loads(proc.stdout)
    row = next(r for r in evaluated["results"] if r["guide"] == "sgl")
    per_item = [d["sgl@0.09"] for d in jsonl(details)]
    logged = samples(setup["out"], "sgl_shapes")
    assert [s["doc_id"] for s in logged] == list(range(N))
    assert len(per_item) == N
    for s, d in zip(logged, per_item):
        assert response(s) == d["answer"], (s, d)
        assert float(s["exact_match"]) == d["correct"], (s, d)
    assert 0 < sum(d["correct"] for d in per_item) < N
    score = results(setup["out"])["results"]["sgl_shapes"]["exact_match,none"]
    assert score == pytest.approx(row["accuracy"])


# Timings; the input's fingerprint (sgl run's, for resuming); the request's task (the adapter's); the reference
# answer (lmms-eval keeps the target in its own samples: a model is never shown it).
IGNORED = ("ms", "input_sha", "task", "reference")


def test_records_equal_sgl_run(setup):
    mine = [r for r in jsonl(setup["records"]) if r["task"] == "sgl_shapes"]
    ref = sgl_run(setup, "run")
    assert len(mine) == len(ref) == N
    for a, b in zip(mine, ref):
        assert {k: v for k, v in a.items() if k not in IGNORED} == {k: v for k, v in b.items() if k not in IGNORED}
    exits = {r["exit"] for r in ref}
    assert exits == {"small", "large"}, exits  # both paths are compared


def test_reported_exit_share_and_kept_tokens_equal_sgl_runs(setup):
    reported = json.loads(setup["summary"].read_text())["tasks"]
    ref = sgl_run(setup, "run")
    answered = [r for r in ref if r["error"] is None]
    large = [r["retained_tokens"] for r in answered if r["exit"] == "large"]
    assert reported["sgl_shapes"] == {
        "items": N, "errors": 0, "small_exits": len(answered) - len(large), "large_calls": len(large),
        "exit_share": (len(answered) - len(large)) / len(answered), "mean_retained_tokens": sum(large) / len(large)}
    assert "exit share" in setup["proc"].stderr and "sgl_shapes_broken" in setup["proc"].stderr


def test_an_item_that_fails_gets_an_empty_answer_and_its_error_logged(setup):
    logged = samples(setup["out"], "sgl_shapes_broken")
    assert [s["doc_id"] for s in logged] == [0, 1, 2]
    answers = [response(s) for s in logged]
    assert answers[1] == ""
    records = [r for r in jsonl(setup["records"]) if r["task"] == "sgl_shapes_broken"]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert records[1]["error"] == "row 2: sgl_shapes_broken: doc_to_visual: this doc's image cannot be read"
    assert records[1]["answer"] is None and records[0]["error"] is None and records[2]["error"] is None
    ref = sgl_run(setup, "run")
    assert [r["answer"] for r in (records[0], records[2])] == [ref[0]["answer"], ref[2]["answer"]]
    assert records[1]["error"] in setup["proc"].stdout + setup["proc"].stderr  # lmms-eval's log
    reported = json.loads(setup["summary"].read_text())["tasks"]["sgl_shapes_broken"]
    assert (reported["items"], reported["errors"]) == (3, 1)


def test_loglikelihood_tasks_are_refused_in_one_line(setup):
    tasks = setup["root"] / "tasks_mc"
    tasks.mkdir(exist_ok=True)
    (tasks / "sgl_shapes_mc.yaml").write_text(
        TASK.format(name="sgl_shapes_mc", data=setup["root"] / "data", visual="image", extra="")
        .replace("output_type: generate_until", "output_type: multiple_choice\ndoc_to_choice: ['red', 'blue']")
        .replace("doc_to_target: answer", "doc_to_target: 0")
        .split("generation_kwargs:")[0] + "metric_list:\n  - metric: acc\n")
    proc = run(["-m", "lmms_eval", "--model", "sgl", "--model_args", model_args(setup["demo"]),
                "--tasks", "sgl_shapes_mc", "--include_path", str(tasks), "--limit", "2"], check=False)
    assert proc.returncode != 0
    line = ("sgl: task(s) sgl_shapes_mc ask for loglikelihood requests; sgl answers generation tasks "
            "(output_type: generate_until) only")
    assert proc.stderr.rstrip().splitlines()[-1] == line, proc.stderr[-2000:]


def test_an_unknown_model_arg_is_one_line(setup):
    proc = run(["-m", "lmms_eval", "--model", "sgl", "--model_args", model_args(setup["demo"], retian=0.5),
                "--tasks", "sgl_shapes", "--include_path", str(setup["tasks"]), "--limit", "1"], check=False)
    assert proc.returncode != 0
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith("sgl: --model_args: unknown argument(s) retian; sgl takes "), last


def test_cmyk_images_are_answered_as_sgl_run_answers_their_files(setup):
    """A CMYK picture from a task's doc_to_visual (before: "cannot write mode CMYK as PNG", an error record) gets the
    record `sgl run` writes for the CMYK JPEG it was decoded from."""
    mine = [r for r in jsonl(setup["records"]) if r["task"] == "sgl_shapes_cmyk"]
    ref = sgl_run(setup, "cmyk", "cmyk.jsonl")
    assert len(mine) == len(ref) == CMYK and all(r["error"] is None for r in ref)
    for a, b in zip(mine, ref):
        assert {k: v for k, v in a.items() if k not in IGNORED} == {k: v for k, v in b.items() if k not in IGNORED}
    assert [response(s) for s in samples(setup["out"], "sgl_shapes_cmyk")] == [r["answer"] for r in ref]


def test_cmyk_images_on_the_vllm_backend(setup):
    """The same CMYK task with the large model on vLLM: the records the transformers backend's `sgl run` writes
    (timings and `large_backend` aside: vLLM answers the built-in pair token for token as transformers does)."""
    import yaml

    preset = yaml.safe_load((setup["demo"] / "preset.yaml").read_text())
    preset["large"].update(backend="vllm", vllm=dict(ENGINE))
    (setup["demo"] / "preset-vllm.yaml").write_text(yaml.safe_dump(preset))
    records = setup["root"] / "vllm.records.jsonl"
    args = model_args(setup["demo"], records=records).replace("preset.yaml", "preset-vllm.yaml")
    proc = run(["-m", "lmms_eval", "--model", "sgl", "--model_args", args, "--tasks", "sgl_shapes_cmyk",
                "--include_path", str(setup["tasks"]), "--output_path", str(setup["root"] / "out_vllm")])
    mine = jsonl(records)
    assert [r["large_backend"] for r in mine] == ["vllm"] * CMYK, proc.stderr[-2000:]
    ref = sgl_run(setup, "cmyk", "cmyk.jsonl")
    assert [{k: v for k, v in r.items() if k not in IGNORED} for r in comparable(mine)] == \
        [{k: v for k, v in r.items() if k not in IGNORED} for r in comparable(ref)]


@pytest.mark.parametrize("arg, value, what", [("retain", "abc", "a number"), ("max_new_tokens", "1.5", "an integer"),
                                              ("threshold", "true", "a number")])
def test_a_model_arg_of_the_wrong_type_is_one_line_naming_it(setup, arg, value, what):
    extra = {arg: value}
    args = ",".join(f"{k}={v}" for k, v in {"preset": setup["demo"] / "preset.yaml", **SETTINGS, **extra}.items())
    proc = run(["-m", "lmms_eval", "--model", "sgl", "--model_args", args, "--tasks", "sgl_shapes",
                "--include_path", str(setup["tasks"]), "--limit", "1"], check=False)
    assert proc.returncode != 0
    shown = {"true": "True"}.get(value, value)  # lmms-eval reads true as a boolean
    assert proc.stderr.rstrip().splitlines()[-1] == f"sgl: --model_args: {arg}={shown} is not {what}", \
        proc.stderr[-2000:]
