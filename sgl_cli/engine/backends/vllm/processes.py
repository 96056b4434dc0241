"""vLLM's engine processes, seen from sgl: they end when the process that started them dies, and the engine core
tells sgl why it could not start.

**Ending with the parent.** vLLM 0.32 starts its EngineCore as a multiprocessing child of the process that makes the
`LLM`, and the EngineCore starts its workers. A worker watches a death pipe from the EngineCore, but the EngineCore
watches nothing: after `kill -9` of sgl the EngineCore, its workers and the resource tracker stay, holding the
model's memory (a GPU's: a `--resume` cannot start) and their /dev/shm queues. So in each of vLLM's engine-core and
worker processes (`arm`, called by sgl's vLLM plugin) a thread checks twice a second that its parent is still its
parent (a process whose parent dies, whatever killed it, is given to init or a subreaper) and then sends its own
process SIGTERM: vLLM's own clean shutdown (the EngineCore stops its workers; each queue's creator unlinks its
segment), rather than a kill that leaves segments to the resource tracker. An alarm ends a shutdown that hangs
(SIGALRM's default action); what is left is then unlinked by the resource tracker, which exits once no process holds
it. Not multiprocessing's sentinel for the parent: a pipe that every process forked from the parent later also
holds, so it stays open while any of them lives. Not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that
started the child ends (a caller may make the engine in a thread that ends), and is Linux's alone.

vLLM calls its plugins in every process it spawns (its EngineCore on a CPU, or where CUDA is initialized, and its
workers), but a process it forks (its EngineCore otherwise: vLLM's default method) inherits the plugins already
loaded and does not call them again: `arm_forked` registers `arm` with multiprocessing's after-fork hooks, which run
in every child multiprocessing forks. `arm` does nothing outside
the processes vLLM names EngineCore and VllmWorker.

**Why an engine did not start.** When the EngineCore fails during start-up (a KV cache larger than the memory, in
a worker or in the EngineCore), vLLM's client raises "Engine core initialization failed. See root cause above": the
cause is only in the child's traceback. The armed EngineCore sends the exception that ended it, as it exits, to a
Unix datagram socket named by its parent's pid (Linux's abstract namespace: no file), which `StartFailures` holds
open while the parent makes its `LLM`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
from multiprocessing import util

ENGINE_CORE, WORKER = "EngineCore", "VllmWorker"  # how vLLM names its processes (EngineCore_DP<n> with data parallel)
POLL_S = 0.5  # how often a process checks that its parent lives
GRACE_S = 20  # a shutdown after the parent's death that takes longer is ended by SIGALRM

_armed_pid: int | None = None  # the process `arm` armed (a forked child inherits the value, not the thread)
_hooked_pid: int | None = None  # the process whose forked children `arm_forked` arms


class _Hook:  # multiprocessing keeps after-fork hooks while their object lives: this module's, for good
    pass


_HOOK = _Hook()


def arm() -> None:
    """In vLLM's engine-core or worker process: end it (SIGTERM, vLLM's clean shutdown) when its parent is gone; in
    the engine core, also report to the parent the exception it ends with. Anywhere else: nothing."""
    global _armed_pid
    me = multiprocessing.current_process()
    parent = multiprocessing.parent_process()
    if parent is None or _armed_pid == os.getpid() or not me.name.startswith((ENGINE_CORE, WORKER)):
        return
    _armed_pid = os.getpid()
    threading.Thread(target=_end_with_parent, args=(parent.pid,), name="sgl-parent-watch", daemon=True).start()
    if me.name.startswith(ENGINE_CORE):
        # Run as the process exits (multiprocessing's exit finalizers), the exception that ended it still current.
        util.Finalize(None, _report_failure, args=(parent.pid,), exitpriority=100)


def arm_forked() -> None:
    """Arm (`arm`) the processes multiprocessing forks from this one from now on."""
    global _hooked_pid
    if _hooked_pid != os.getpid():
        _hooked_pid = os.getpid()
        util.register_after_fork(_HOOK, lambda _: arm())


def _end_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    signal.alarm(GRACE_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _address(parent_pid: int) -> str:
    return f"\0sgl-vllm-start-{parent_pid}"


def _report_failure(parent_pid: int) -> None:
    exc = sys.exc_info()[1]
    if exc is None or isinstance(exc, (SystemExit, KeyboardInterrupt)):
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:65000], _address(parent_pid))
    except OSError:  # nobody listens (the engine had started), or no abstract sockets (not Linux)
        pass


class StartFailures:
    """While an `LLM` is made (`with StartFailures() as failures:`), what its engine core reports as the exception
    that ended it (`failures.received()`, oldest first). Receives nothing where the socket cannot be bound (not
    Linux, or another engine of this process is starting)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def __enter__(self) -> "StartFailures":
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            return self
        try:
            sock.bind(_address(os.getpid()))
            sock.setblocking(False)
            self.sock = sock
        except OSError:
            sock.close()
        return self

    def received(self) -> list[str]:
        out = []
        while self.sock is not None:
            try:
                out.append(self.sock.recv(65536).decode("utf-8", "replace"))
            except OSError:  # nothing more
                break
        return out

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_WORKER_FAILED = re.compile(r"Worker failed with error '(.*)', please check the stack trace above", re.S)
_TYPE = re.compile(r"^[A-Za-z_][\w.]*: ")


def start_failure_reason(exc: BaseException, reports: list[str]) -> str:
    """One line saying why vLLM's `LLM(...)` raised `exc`: a configuration vLLM's pydantic models reject (each
    error's message), the engine core's reported exception for a failed start (a worker's own message unwrapped
    from the engine core's "Worker failed with error '...'"), or else `exc`'s type and first line."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ == "ValidationError" and callable(errors):
        try:
            found = [_validation_message(e) for e in errors()]
        except Exception:  # noqa: BLE001 - not pydantic's after all: fall through to the first line
            found = []
        if found:
            return "; ".join(found)
    if reports:
        text = reports[-1]
        worker = _WORKER_FAILED.search(text)
        return _one_line(worker.group(1) if worker else _TYPE.sub("", text))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"


def _validation_message(error: dict) -> str:
    msg = str(error.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    # vLLM's messages go on with advice about its environment variables: the first sentence says what is wrong.
    msg = re.split(r"(?<=[.!?])\s+(?=[A-Z])", _one_line(msg), maxsplit=1)[0]
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "__root__")
    return f"{where}: {msg}" if where else msg


def _one_line(text: str) -> str:
    return " ".join(text.split())
