"""What a command leaves when it is stopped, and what its stdout carries, without vLLM (tests_vllm/test_lifecycle.py
runs the same on vLLM's engine): SIGTERM goes Ctrl-C's way (one line with the command that continues, exit 143,
then `--resume` completes the records); vLLM's engine processes end when their parent dies, by the SIGTERM of their
own clean shutdown (processes.py, exercised on stand-in processes named as vLLM names its own); the engine core's
start-up failure reaches the parent's one-line error; stdout carries the data alone, whatever the libraries and the
processes they start print."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tests.conftest import ROOT, long_job, make_images, write_jsonl, write_preset


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_sigterm_stops_sgl_run_as_ctrl_c_does_and_resume_completes(tmp_path, tiny_pair):
    src, preset, out = long_job(tmp_path, tiny_pair)
    cmd = [sys.executable, "-m", "sgl_cli", "run", str(src), "-p", str(preset), "-q", "--threads", "1", "--pipeline",
           "streaming"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    written = len(records(out))
    assert 2 <= written < 12, "the run should have been stopped midway"
    again = f"sgl run {src} --preset {preset} --pipeline streaming --threads 1 --quiet --resume"
    assert lines[-1] == f"sgl: terminated (SIGTERM) after {written} items; `{again}` continues where it stopped."
    assert stdout == ""
    done = subprocess.run([sys.executable, "-m", "sgl_cli", *again.split()[1:]], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole.jsonl"
    full = subprocess.run(cmd + ["-o", str(whole)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert full.returncode == 0, full.stderr
    strip = lambda rs: [{k: v for k, v in r.items() if k != "ms"} for r in rs]  # noqa: E731
    assert strip(records(out)) == strip(records(whole))


def test_sigterm_stops_sgl_eval_in_one_line(tmp_path, tiny_pair):
    imgs = make_images(tmp_path)
    rows = [{"image": imgs[i % 3].name, "question": f"question {i}?", "answer": "red"} for i in range(12)]
    src = write_jsonl(tmp_path / "labelled.jsonl", rows)
    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=16, batch_size=1)
    details = tmp_path / "details.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sgl_cli", "eval", str(src), "-p", str(preset), "--json",
                             "--details", str(details), "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and (not details.exists() or not details.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "sgl: terminated (SIGTERM)."
    assert stdout == ""


# A parent that starts, as vLLM does, an engine core by fork (its plugins already loaded: `arm_forked`) and a worker
# by spawn (which loads them: `arm`), and a process of its own; each child records the signal that ends it and
# sleeps. The parent prints their pids, then sleeps until killed.
PARENT = textwrap.dedent("""
    import multiprocessing as mp, os, signal, sys, time
    from pathlib import Path
    from sgl_cli.engine.backends.vllm import processes

    def child(marks, arm, ignore_term):
        if arm:
            processes.arm()  # what sgl's vLLM plugin does in a process vLLM spawns
        def on_term(signum, frame):
            Path(marks, mp.current_process().name).write_text("SIGTERM")
            if not ignore_term:
                sys.exit(0)  # vLLM's clean shutdown, in short
        signal.signal(signal.SIGTERM, on_term)
        while True:
            time.sleep(0.1)

    if __name__ == "__main__":
        marks, ignore_term = sys.argv[1], sys.argv[2] == "hang"
        processes.GRACE_S = 3
        processes.arm_forked()  # what sgl's vLLM plugin does in the process that makes the LLM
        procs = [mp.get_context("fork").Process(target=child, args=(marks, False, ignore_term), name="EngineCore"),
                 mp.get_context("spawn").Process(target=child, args=(marks, True, ignore_term), name="VllmWorker-0"),
                 mp.get_context("fork").Process(target=child, args=(marks, True, False), name="Other")]
        for p in procs:
            p.start()
        time.sleep(3)  # the spawned child imports and arms
        print(" ".join(str(p.pid) for p in procs), flush=True)
        time.sleep(600)
""")


@pytest.mark.parametrize("shutdown", ["clean", "hang"])
def test_vllms_processes_end_when_their_parent_is_killed(tmp_path, shutdown):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    marks = tmp_path / "marks"
    marks.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(marks), shutdown], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    engine_core, worker, other = (int(p) for p in parent.stdout.readline().split())
    try:
        assert all(_alive(p) for p in (engine_core, worker, other))
        parent.kill()  # kill -9: nothing of the parent runs
        parent.wait()
        # Each ends by the SIGTERM of its clean shutdown; one whose shutdown hangs, by the alarm GRACE_S later.
        assert _wait_gone([engine_core, worker], 30) == []
        assert sorted(p.name for p in marks.iterdir()) == ["EngineCore", "VllmWorker-0"]
        # A process vLLM did not start is left alone.
        assert _alive(other) and not (marks / "Other").exists()
    finally:
        for pid in (engine_core, worker, other):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


FAILING = textwrap.dedent("""
    import multiprocessing as mp
    from sgl_cli.engine.backends.vllm import processes

    REASON = ("Available memory on node 0 (16.74/23.54 GiB) on kv cache allocation is less than requested memory "
              "for kv (1000.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory "
              "used by other processes.")

    def engine_core():  # as vLLM's engine core fails when its worker cannot allocate the KV cache
        raise RuntimeError(f"Worker failed with error '{REASON}', please check the stack trace above for the root "
                           "cause")

    if __name__ == "__main__":
        processes.arm_forked()
        with processes.StartFailures() as failures:
            p = mp.get_context("fork").Process(target=engine_core, name="EngineCore")
            p.start()
            p.join()
            # What vLLM's client raises then:
            exc = RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): "
                               "{'EngineCore': 1}")
            print(processes.start_failure_reason(exc, failures.received()))
""")


def run_script(folder: Path, text: str, timeout: float) -> subprocess.CompletedProcess:
    """`text` run as a Python script in a process of its own, with sgl importable."""
    script = folder / "script.py"
    script.write_text(text)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    return res


def test_the_engine_cores_start_failure_reaches_the_parents_line(tmp_path):
    res = run_script(tmp_path, FAILING, timeout=120)
    assert res.stdout == ("Available memory on node 0 (16.74/23.54 GiB) on kv cache allocation is less than requested "
                          "memory for kv (1000.0 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or "
                          "reduce CPU memory used by other processes.\n")


def test_a_configuration_vllm_rejects_is_said_in_vllms_words():
    import pydantic

    from sgl_cli.engine.backends.vllm.processes import start_failure_reason

    class ModelConfig(pydantic.BaseModel):  # vLLM's check, as vLLM 0.32 words it
        max_model_len: int

        @pydantic.model_validator(mode="after")
        def fits(self):
            if self.max_model_len > 4096:
                raise ValueError(f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                                 "max_model_len (max_position_embeddings=4096.0 or model_max_length=None in model's "
                                 "config.json). To allow overriding this maximum, set the env var "
                                 "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with "
                                 "extreme caution.")
            return self

    with pytest.raises(pydantic.ValidationError) as err:
        ModelConfig(max_model_len=100000)
    assert str(err.value).startswith("1 validation error for ModelConfig")  # all sgl said before
    assert start_failure_reason(err.value, []) == (
        "User-specified max_model_len (100000) is greater than the derived max_model_len (max_position_embeddings="
        "4096.0 or model_max_length=None in model's config.json).")
    with pytest.raises(pydantic.ValidationError) as err:
        ModelConfig(max_model_len="many")
    assert start_failure_reason(err.value, []) == "max_model_len: Input should be a valid integer, unable to parse " \
        "string as an integer"
    # Anything else: its type and first line, as before.
    assert start_failure_reason(OSError("no such file\nmore"), []) == "OSError: no such file"


DATA = textwrap.dedent("""
    import os, subprocess, sys
    from sgl_cli.commands._common import data_stdout

    print("before", flush=True)
    with data_stdout() as data:
        print("a library's print")
        os.write(1, b"a C library's write\\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"])
        data.write("the data\\n")
    print("after", flush=True)
""")


def test_data_stdout_keeps_what_libraries_and_children_print_off_stdout(tmp_path):
    res = run_script(tmp_path, DATA, timeout=60)
    assert res.stdout == "before\nthe data\nafter\n"
    assert res.stderr.splitlines() == ["a library's print", "a C library's write", "a child process"]
