"""`sgl run --backend ray`: the local backend's records, computed by a pool of Ray actors (one or many machines).

The input (any format: `io/formats/`) is turned into a Ray dataset of its items' (`line`, `payload`): the
items an interrupted run already recorded are left out, as for the local backend. Its blocks
are cut where the local engine cuts its batches (after every `batch_size` runnable items), so every model call
sees the same rows, padding included, and the records are the local backend's to the last bit. A pool of
`num_workers` actors each loads the pair once (one `Engine`) and turns a block at a time into records with the
same parsing (the source travels to the workers) and the same engine. Ray Data hands the records back in input order
(`preserve_order`), and the caller writes them with the same writer, so the output file, `--resume` and the exit
code are the local backend's. Records are shipped pickled, so no field is reshaped by Arrow.

Where it runs: `ray.init()` joins the cluster named by `RAY_ADDRESS` or the one this machine belongs to (`ray start`),
else it starts a local one. Every worker needs sgl installed (and the plugins the run names: docs/presets.md) and
must see the image paths (and the model folders) the driver sees: shared storage, or the same paths on every node.
Image URLs are fetched by the workers.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import SglError

INSTALL_HINT = "pip install 'sgl-cli[ray]' (or: pip install 'ray[data]>=2.9')"
MAX_BLOCKS = 10_000  # more blocks stream and resume more finely; each is one object in Ray's store


def import_ray():
    """Ray, or an SglError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the `data` extra
    except ImportError as exc:
        raise SglError(f"--backend ray needs Ray Data, which is not installed ({exc.name or exc}): "
                       f"{INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    num_workers: int | None = None  # None: one per `gpus_per_worker` GPUs of the cluster, else 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    threads: int | None = None  # CPUs reserved by, and torch threads of, each worker (default 1)

    def validate(self) -> None:
        if self.num_workers is not None and self.num_workers < 1:
            raise SglError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise SglError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker:g}")
        if self.threads is not None and self.threads < 1:
            raise SglError(f"--threads must be >= 1, got {self.threads}")


def input_batches(source, skip: int, batch_size: int,
                  failed: list | None = None) -> list[list[tuple[int, bytes]]]:
    """The source's items from the `skip`-th on as (line, pickled payload), in the batches `Engine.run` makes of
    them: each ends at its `batch_size`-th runnable (parseable) item. An input that breaks part-way ends there, its
    error appended to `failed` (raised once the items before it are recorded; without `failed`: at once)."""
    from ..io.batches import batches, until_failure

    def runnable(pair) -> bool:
        return source.parse(*pair).error is None

    read = source if failed is None else until_failure(source, failed)
    pairs = ((line, payload) for n, (line, payload) in enumerate(read) if n >= skip)
    return [[(line, pickle.dumps(payload)) for line, payload in batch]
            for batch in batches(pairs, batch_size, runnable)]


def blocks(batches: list[list[tuple[int, bytes]]], max_blocks: int = MAX_BLOCKS) -> list[list[tuple[int, bytes]]]:
    """Whole batches packed into at most `max_blocks` blocks (one batch each, when there are few enough)."""
    per_block = max(1, math.ceil(len(batches) / max_blocks))
    return [[row for batch in batches[i:i + per_block] for row in batch] for i in range(0, len(batches), per_block)]


class EngineWorker:
    """One Ray actor: the pair loaded once, turning batches of input items into JSON records."""

    def __init__(self, preset, source, cwd: str, threads: int, fetch=None, save_scores: bool = False):
        from ..core.threads import use_threads

        use_threads(threads)
        if os.path.isdir(cwd):  # relative paths (images, the input's folder) resolve as on the driver
            os.chdir(cwd)
        from ..pipeline.engine import Engine

        self.source = source
        self.engine = Engine.load(preset, fetch=fetch)  # the Run resolved its calibration
        self.engine.save_scores = save_scores

    def __call__(self, block: dict) -> dict:
        import numpy as np

        # A whole block per call: the engine batches it exactly as the local backend batches the same items.
        # The payloads were pickled by this run's own driver.
        items = [self.source.parse(int(line), pickle.loads(payload))
                 for line, payload in zip(block["line"], block["payload"])]
        records = [pickle.dumps(r) for r in self.engine.run(items)]  # scores travel as numpy arrays
        return {
            "record": np.array(records, dtype=object),
            "random_weights": np.full(len(records), bool(self.engine.random_weights)),
        }


def worker_gpus(preset) -> float:
    """The GPUs one worker's pair needs on a cluster with GPUs, as its large backend says (one; a vLLM engine's
    tensor-parallel size)."""
    from ..backends import backend_class

    return float(backend_class(preset.large.backend).gpus_per_worker(preset.large.options))


def _plan(ray, options: RayOptions, n_blocks: int, notify: Callable[[str], None],
          per_worker: float = 1.0) -> tuple[int, float, int]:
    """(workers, GPUs per worker, CPUs per worker) for this cluster; `per_worker`: the GPUs a worker's pair needs
    (`worker_gpus`), the default where --gpus-per-worker is not given."""
    resources = ray.cluster_resources()
    cluster_gpus, cluster_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (per_worker if cluster_gpus else 0.0)
    cpus = options.threads or 1
    workers = min(options.num_workers or (max(1, int(cluster_gpus // gpus)) if gpus else 1), max(1, n_blocks))
    notify(f"sgl: ray: {workers} worker{'s' * (workers != 1)} x {cpus} CPU{'s' * (cpus != 1)}, {gpus:g} GPU; "
           f"the cluster has {cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs")
    if workers * gpus > cluster_gpus or workers * cpus > cluster_cpus:
        # Not an error: an autoscaling cluster adds nodes; a fixed one runs as many workers as fit.
        notify("sgl: ray: the cluster has fewer resources than all workers ask for now; the workers that fit "
               "start first, the others when nodes join")
    return workers, gpus, cpus


def _quiet_ray(ray) -> None:
    """Our progress bar and summary only: Ray Data's bars and execution logs off, order kept."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # records come back in input order
    for name, value in (("enable_progress_bars", False), ("print_on_execution_start", False),
                        ("enable_auto_log_stats", False)):
        if hasattr(ctx, name):
            setattr(ctx, name, value)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


_SGL_ERROR_LINE = re.compile(r"^sgl_cli\.engine\.errors\.\w+: (.+)$", re.MULTILINE)


def _one_line(exc: BaseException) -> str:
    """Why Ray failed, in one line: an SglError raised in a worker (a model that cannot load, say) as is, else the
    innermost error's last line. Ray wraps worker errors (an actor whose __init__ raised only keeps the traceback
    text), so the chain and the texts are searched."""
    chain, seen = [], set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, SglError):
            return str(e)
        found = _SGL_ERROR_LINE.findall(str(e))
        if found:
            return found[-1].strip()
    for e in chain:  # the first error that says something
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines:
            return f"the Ray backend failed: {type(e).__name__}: {lines[-1] if len(lines) > 1 else lines[0]}"
    return f"the Ray backend failed: {type(chain[0]).__name__}"


def run_records(source, preset, skip: int, options: RayOptions, fetch=None,
                on_random_weights: Callable[[], None] | None = None,
                notify: Callable[[str], None] | None = None, save_scores: bool = False) -> Iterator[dict]:
    """Yield one record per input item from the `skip`-th on, in input order, as Ray's workers complete them.
    `notify` receives one-line notes (the worker plan); `on_random_weights` is called once when the workers'
    models have random weights."""
    options.validate()
    failed: list[BaseException] = []  # the input broke part-way: raised after the records of the items before it
    parts = blocks(input_batches(source, skip, preset.settings.batch_size, failed))
    if not parts:
        if failed:
            raise failed[0]
        return
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - one line at the CLI edge
            detail = (str(exc).strip().splitlines() or [""])[0]
            raise SglError(f"cannot join or start a Ray cluster: {type(exc).__name__}: {detail}") from None
    try:
        _quiet_ray(ray)
        workers, gpus, cpus = _plan(ray, options, len(parts), notify or (lambda _: None), worker_gpus(preset))
        # One block per batch (small blocks stream back, are written and survive a kill as soon as they are done).
        import pyarrow as pa

        ds = ray.data.from_arrow([pa.table({"line": [n for n, _ in part], "payload": [p for _, p in part]})
                                  for part in parts])
        ds = ds.map_batches(
            EngineWorker,
            fn_constructor_kwargs={"preset": preset, "source": source, "cwd": os.getcwd(), "threads": cpus,
                                   "fetch": fetch, "save_scores": save_scores},
            batch_size=None,  # a whole block per call: block boundaries are batch boundaries
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        warned = False
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not warned and on_random_weights is not None and bool(batch["random_weights"].any()):
                    on_random_weights()
                    warned = True
                for data in batch["record"]:
                    yield pickle.loads(data)  # pickled by this run's own workers
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start fails the run in one line
            raise SglError(_one_line(exc)) from None
        if failed:
            raise failed[0]
    finally:
        if started:
            ray.shutdown()
