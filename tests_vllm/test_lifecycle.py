"""Nothing left running, nothing misreported, on vLLM's engine: `sgl run --large-backend vllm` as a process of its
own session, its engine processes (EngineCore, its worker, the resource tracker) and the /dev/shm segments they
hold recorded from /proc before it is stopped.

- SIGTERM mid-run goes Ctrl-C's way: the engine shut down, one line with the command that continues, exit 143, no
  process or segment left; `--resume` then gives the uninterrupted run's records;
- kill -9 mid-run and during the engine's start-up: the engine processes end by themselves (processes.py), their
  segments unlinked; SIGTERM during the start-up ends the run as mid-run;
- stdout is the data alone with vLLM loaded (`run -o -`, `eval --json`, `inspect --json`), vLLM's logs on stderr,
  and `--quiet` quietens them;
- a configuration vLLM rejects, and a KV cache larger than the machine, end in one line with vLLM's reason.

/dev/shm is shared with other vLLM runs on the machine: only the segments this process tree held are counted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import comparable, records
from typer.testing import CliRunner

from sgl_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
INFO = re.compile(r"\bINFO \d\d-\d\d \d\d:\d\d:\d\d ")  # a line of vLLM's log at INFO level
runner = CliRunner()


def descendants(pid: int) -> list[int]:
    out = []
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:
        return out
    for c in children:
        out += [c, *descendants(c)]
    return out


def shared_memory(pids) -> set[str]:
    """The /dev/shm files the processes have open or mapped."""
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
            maps = Path(f"/proc/{pid}/maps").read_text().split()
        except OSError:
            continue
        found |= {p for p in links + maps if p.startswith("/dev/shm/")}
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended (its new parent reaps it)


def left_after(*runs: "Sgl", seconds: float) -> tuple[list[int], list[str]]:
    """What is still there of the runs' process trees after up to `seconds`: processes alive, and segments not
    unlinked."""
    deadline = time.time() + seconds
    while True:
        pids = set().union(*(r.pids for r in runs))
        shm = set().union(*(r.segments for r in runs))
        procs, files = sorted(p for p in pids if alive(p)), sorted(s for s in shm if os.path.exists(s))
        if not (procs or files) or time.time() > deadline:
            return procs, files
        time.sleep(0.5)


class Sgl:
    """`sgl ARGS` as a process of its own session; `pids` and `segments`: its descendants and the /dev/shm files
    they held, as seen so far (every 0.2 s while sgl or any of them lives: orphans and what they start count);
    `out` and `err`: what it wrote so far."""

    started: list["Sgl"] = []

    def __init__(self, *args, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "sgl_cli", *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env or ENV,
                                     start_new_session=True)
        Sgl.started.append(self)
        self.pids: set[int] = set()
        self.segments: set[str] = set()
        self._out: list[str] = []
        self._err: list[str] = []
        threading.Thread(target=self._watch, daemon=True).start()
        # Read as written: the engine processes inherit the pipes, so their end is not sgl's.
        for stream, lines in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            threading.Thread(target=lambda s=stream, o=lines: o.extend(iter(s.readline, "")), daemon=True).start()

    @property
    def out(self) -> str:
        return "".join(self._out)

    @property
    def err(self) -> str:
        return "".join(self._err)

    def _watch(self) -> None:
        while True:
            roots = ([self.proc.pid] if self.proc.poll() is None else []) + [p for p in self.pids if alive(p)]
            if not roots:
                return
            tree = {p for r in roots for p in (r, *descendants(r))}
            self.segments |= shared_memory(tree)
            self.pids |= tree - {self.proc.pid}
            time.sleep(0.2)

    def names(self) -> set[str]:
        return {comm(pid) for pid in descendants(self.proc.pid)}

    def wait_for(self, condition, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while not condition():
            assert self.proc.poll() is None, f"sgl ended before {what}: {self.err[-3000:]}"
            assert time.time() < deadline, f"no {what} after {seconds} s"
            time.sleep(0.2)

    def finish(self, timeout: float = 900) -> int:
        """sgl's exit code, and what it wrote (a second to read the rest)."""
        code = self.proc.wait(timeout)
        time.sleep(1)
        return code

    def cleanup(self) -> None:
        """End what a failed test left: sgl's session, then every process of its tree but the resource tracker,
        which then unlinks what they registered and exits."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        trackers = {p for p in self.pids if "resource_tracker" in cmdline(p)}
        for pid in self.pids - trackers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in trackers):
            time.sleep(0.2)
        for pid in trackers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def _nothing_left_to_the_next_test():
    yield
    while Sgl.started:
        Sgl.started.pop().cleanup()


def said(err: str) -> list[str]:
    """sgl's own lines on stderr (the resource tracker, a process of its own, may warn after them)."""
    return [line for line in err.splitlines() if line.startswith("sgl: ")]


def written(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture
def batch(tmp_path) -> Path:
    """16 items: the example batch twice, image paths absolute."""
    rows = [json.loads(line) for line in (EXAMPLES / "batch.jsonl").read_text().splitlines()]
    out = []
    for i in range(16):
        r = dict(rows[i % len(rows)], id=f"item-{i}")
        r["image"] = str(EXAMPLES / r["image"])
        out.append(json.dumps(r) + "\n")
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(out))
    return path


RUN = ("--no-exit", "--batch-size", "2", "--pipeline", "streaming")  # every item through vLLM, both stages at once


def test_sigterm_mid_run_shuts_the_engine_down_and_resume_completes(tmp_path, batch, vllm_preset):
    out = tmp_path / "out.jsonl"
    sgl = Sgl("run", batch, "-p", vllm_preset, "-o", out, *RUN)
    sgl.wait_for(lambda: written(out) >= 2, 900, "record")
    assert {"VLLM::EngineCor", "VLLM::Worker"} <= sgl.names() and sgl.segments  # the engine, with its segments
    sgl.proc.send_signal(signal.SIGTERM)
    assert sgl.finish(300) == 143, sgl.err[-3000:]
    n = written(out)
    assert 2 <= n < 16
    again = (f"sgl run {batch} --out {out} --preset {vllm_preset} --no-exit --batch-size 2 --pipeline streaming"
             " --resume")
    assert said(sgl.err)[-1] == \
        f"sgl: terminated (SIGTERM) after {n} items; `{again}` continues where it stopped."
    assert sgl.out == ""
    assert left_after(sgl, seconds=30) == ([], [])

    resumed = Sgl(*again.split()[1:], "-q")
    assert resumed.finish() == 0, resumed.err[-3000:]
    assert left_after(resumed, seconds=60) == ([], [])
    reference = tmp_path / "reference.jsonl"  # the uninterrupted run, on transformers: the records vLLM's equal
    res = runner.invoke(app, ["run", str(batch), "-o", str(reference), "-q", *RUN])
    assert res.exit_code == 0, res.output
    got = records(out)
    assert [r["id"] for r in got] == [f"item-{i}" for i in range(16)]
    assert comparable(got) == comparable(records(reference))


def starting(sgl: Sgl) -> bool:
    """The engine core and its worker are there (the engine not ready: that takes tens of seconds more)."""
    return any(comm(p) == "VLLM::EngineCor" and descendants(p) for p in sgl.pids)


@pytest.mark.parametrize("how, when", [("kill -9", "mid-run"), ("kill -9", "start-up"), ("SIGTERM", "start-up")])
def test_a_stopped_run_leaves_no_engine_process_or_shared_memory(tmp_path, batch, vllm_preset, how, when):
    out = tmp_path / "out.jsonl"
    sgl = Sgl("run", batch, "-p", vllm_preset, "-o", out, *RUN)
    if when == "mid-run":
        sgl.wait_for(lambda: written(out) >= 2, 900, "record")
    else:
        sgl.wait_for(lambda: starting(sgl), 900, "engine core with a worker")
    time.sleep(1)
    assert len(sgl.pids) >= 3 and sgl.segments  # the resource tracker, the engine core, its worker; segments
    if how == "kill -9":
        os.kill(sgl.proc.pid, signal.SIGKILL)  # sgl alone: nothing of it runs
        assert sgl.finish(60) == -signal.SIGKILL
    else:  # vLLM swallows a KeyboardInterrupt while it starts: SIGTERM must not be one
        sgl.proc.send_signal(signal.SIGTERM)
        assert sgl.finish(120) == 143, sgl.err[-3000:]
        again = (f"sgl run {batch} --out {out} --preset {vllm_preset} --no-exit --batch-size 2 --pipeline streaming"
                 " --resume")
        assert said(sgl.err)[-1] == f"sgl: terminated (SIGTERM) after 0 items; `{again}` continues where it stopped."
    if when == "start-up":
        assert not out.exists()
    # After kill -9, each process ends by its own clean shutdown, or by the alarm after it (processes.GRACE_S).
    assert left_after(sgl, seconds=120) == ([], [])


def test_stdout_is_the_data_alone_with_vllm_loaded(tmp_path, vllm_preset):
    src = EXAMPLES / "batch.jsonl"
    # sgl run -o -: one record per line; --quiet: vLLM logs no INFO line.
    run = Sgl("run", src, "-p", vllm_preset, "-o", "-", "-q")
    assert run.finish() == 0, run.err[-3000:]
    lines = run.out.splitlines()
    assert [json.loads(line)["line"] for line in lines] == list(range(1, 9))
    assert not [line for line in run.err.splitlines() if INFO.search(line)]
    assert left_after(run, seconds=60) == ([], [])
    # sgl eval --json: one JSON object, vLLM's log (INFO lines, without --quiet) on stderr.
    ev = Sgl("eval", src, "-p", vllm_preset, "--json", "--guide", "sgl", "--retain", "0.5", "--limit", "3")
    assert ev.finish() == 0, ev.err[-3000:]
    result = json.loads(ev.out)
    assert result["items"] == 3 and result["results"][0]["guide"] == "sgl"
    assert any(INFO.search(line) for line in ev.err.splitlines())
    assert left_after(ev, seconds=60) == ([], [])
    # sgl inspect --json, the large model's answer from vLLM.
    ins = Sgl("inspect", EXAMPLES / "images" / "shapes_7_0000.jpg", "--question", "What shape is red?", "-p",
              vllm_preset, "--json", "--answer-large")
    assert ins.finish() == 0, ins.err[-3000:]
    shown = json.loads(ins.out)
    assert shown["question"] == "What shape is red?" and shown["guide"] == "sgl"
    assert isinstance(shown["large_answer"], str) and shown["large_answer"]
    assert left_after(ins, seconds=60) == ([], [])


def test_a_max_model_len_over_the_models_is_said_in_one_line(tmp_path, vllm_preset):
    data = yaml.safe_load(vllm_preset.read_text())
    data["large"]["vllm"]["max_model_len"] = 100000
    preset = tmp_path / "long.yaml"
    preset.write_text(yaml.safe_dump(data))
    sgl = Sgl("run", EXAMPLES / "batch.jsonl", "-p", preset, "-o", tmp_path / "out.jsonl", "-q")
    assert sgl.finish() == 2, sgl.err[-3000:]
    assert said(sgl.err) == [
        "sgl: error: vLLM cannot load the large model 'builtin:default/large': User-specified max_model_len (100000) "
        "is greater than the derived max_model_len (max_position_embeddings=4096.0 or model_max_length=None in "
        "model's config.json)."]
    assert not (tmp_path / "out.jsonl").exists()


def test_a_kv_cache_larger_than_the_machine_is_said_in_one_line(tmp_path, vllm_preset):
    sgl = Sgl("run", EXAMPLES / "batch.jsonl", "-p", vllm_preset, "-o", tmp_path / "out.jsonl", "-q",
              env={**ENV, "VLLM_CPU_KVCACHE_SPACE": "100000"})  # GiB
    assert sgl.finish() == 2, sgl.err[-3000:]
    (last,) = said(sgl.err)
    assert re.fullmatch(r"sgl: error: vLLM cannot load the large model 'builtin:default/large': Available memory on "
                        r"node 0 \([\d.]+/[\d.]+ GiB\) on kv cache allocation is less than requested memory for kv "
                        r"\(100000\.0 GiB\)\. Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce "
                        r"CPU memory used by other processes\.", last), last
    assert left_after(sgl, seconds=60) == ([], [])
