"""sgl as a model of lmms-eval: `lmms-eval --model sgl --model_args preset=...,retain=0.09,...` (docs/lmms-eval.md).

lmms-eval (0.7.x) finds third-party models through the entry-point group `lmms_eval.models`: sgl's pyproject.toml
points `sgl` there at `manifest`, which lmms-eval calls for a `ModelManifest` naming `SglModel` below. Each
generate_until request becomes one sgl `Item` (its images, the task's prompt as the question, the row doc_id + 1,
the doc's `id` when it has one) and every request is answered through sgl's `Engine`, as `sgl run` answers items:
batched by `batch_size`, early exit and pruning as the preset and settings say, one record per item; an item that
fails gets an empty answer and its error is logged. Loglikelihood and multi-round requests are refused in one line.

What lmms-eval's results cannot carry (a model has no hook into them: its metrics come from the tasks' own
process_results), sgl reports beside them: per task the share of answered items that exited early and the mean
kept visual tokens of the large calls, as a table on stderr and, with `summary=PATH`, a JSON file.
`records=PATH` writes sgl's records (as `sgl run` writes them, with the request's `task` added).

Only `sgl_cli.engine`'s public API is used; lmms-eval is imported when lmms-eval itself loads this model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "sgl"
CLASS_PATH = "sgl_cli.integrations.lmms_eval.SglModel"

# The sgl settings `--model_args` may give (each as in `sgl run`), and the other arguments sgl takes there.
SETTINGS = {"retain": float, "threshold": float, "consistency_retain": float, "max_new_tokens": int,
            "max_prompt_tokens": int, "prune_layer": int, "prompt_suffix": str, "batch_size": int, "guide": str,
            "seed": int}
OWN = ("preset", "calibration", "no_exit", "quantize", "records", "summary", "threads")


def setting(key: str, value: Any, kind: type = str) -> Any:
    """One `--model_args` value as `kind` (lmms-eval gives numbers, booleans or strings); ValueError naming the
    key for a value that is not one ("retain=abc is not a number")."""
    if kind is str:
        return str(value)
    if kind is bool:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{key}={value} is not true or false")
    if not isinstance(value, bool):  # True is an int to Python, not a number to a user
        if kind is int:
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
        elif isinstance(value, (int, float)):
            return float(value)
        elif isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise ValueError(f"{key}={value} is not {'an integer' if kind is int else 'a number'}")


def manifest():
    """The entry point's payload: lmms-eval's manifest of the `sgl` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


@dataclass
class TaskStats:
    """What sgl did on one task's items, counted as `RunSummary` counts a run."""

    items: int = 0
    errors: int = 0
    small_exits: int = 0
    large_calls: int = 0
    retained: int = 0  # kept visual tokens, summed over the large calls

    def add(self, record: dict) -> None:
        self.items += 1
        if record["error"]:
            self.errors += 1
        elif record["exit"] == "small":
            self.small_exits += 1
        else:
            self.large_calls += 1
            self.retained += record["retained_tokens"]

    def to_dict(self) -> dict:
        answered = self.small_exits + self.large_calls
        return {"items": self.items, "errors": self.errors, "small_exits": self.small_exits,
                "large_calls": self.large_calls,
                "exit_share": self.small_exits / answered if answered else None,
                "mean_retained_tokens": self.retained / self.large_calls if self.large_calls else None}


def summarize(records_by_task: dict[str, list[dict]]) -> dict[str, dict]:
    """Per task: the share of answered items that exited early and the mean kept tokens of the large calls."""
    out = {}
    for task, records in records_by_task.items():
        stats = TaskStats()
        for record in records:
            stats.add(record)
        out[task] = stats.to_dict()
    return out


def table(summary: dict[str, dict]) -> str:
    """The per-task summary as a few aligned lines."""
    head = ("task", "items", "errors", "exit share", "mean kept tokens")
    rows = [head] + [(task, str(s["items"]), str(s["errors"]),
                      "-" if s["exit_share"] is None else f"{s['exit_share']:.3f}",
                      "-" if s["mean_retained_tokens"] is None else f"{s['mean_retained_tokens']:.1f}")
                     for task, s in summary.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def stop_at(answer: str, until: Any) -> str:
    """`answer` cut at the first of lmms-eval's stop strings (sgl generates to its own end; lmms-eval's models
    apply `until` the same way, after generation)."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop and stop in answer:
            answer = answer[: answer.index(stop)]
    return answer


# What lmms-eval's video tasks give as a visual: the video file's path.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpeg", ".mpg", ".ts", ".gif")


def media_refs(visuals: Any, where: str):
    """(image references, video reference or None) for what a task's doc_to_visual returned: images as
    `image_refs` takes them, and at most one video, named by a path with a video file's suffix (lmms-eval's video
    tasks give the file's path). Raises ValueError for a second video."""
    from sgl_cli.engine import ImageRef, VideoRef

    images, video = [], None
    listed = visuals if isinstance(visuals, (list, tuple)) else [visuals]
    for k, visual in enumerate(listed):
        if isinstance(visual, (str, Path)) and Path(str(visual)).suffix.lower() in VIDEO_SUFFIXES:
            if video is not None:
                raise ValueError(f"visual {k + 1} is a second video; sgl takes one video per item")
            video = VideoRef(ImageRef.parse(str(visual), Path.cwd()))
        else:
            images.append(visual)
    return image_refs(images, where), video


def image_refs(visuals: Any, where: str):
    """sgl's image references for what a task's doc_to_visual returned (PIL images, in any mode sgl converts from
    a file, or paths); raises ValueError for anything else (audio; a mode sgl cannot convert)."""
    from PIL import Image

    from sgl_cli.engine import ImageRef, to_rgb

    refs = []
    for k, visual in enumerate(visuals if isinstance(visuals, (list, tuple)) else [visuals]):
        if visual is None:
            continue
        if isinstance(visual, Image.Image):
            try:  # converted as sgl converts a decoded file (CMYK, 16-bit, alpha...), then re-encoded losslessly
                rgb = to_rgb(visual)
            except ValueError as exc:
                raise ValueError(f"visual {k + 1} {exc}") from None
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")
            refs.append(ImageRef("bytes", buf.getvalue(), f"{where} image {k + 1}"))
        elif isinstance(visual, (str, Path)):
            refs.append(ImageRef.parse(str(visual), Path.cwd()))
        else:
            raise ValueError(f"visual {k + 1} is a {type(visual).__name__}, not an image sgl reads")
    return refs


def _fail(message: str):
    """End the evaluation with one line (lmms-eval prints exceptions as tracebacks)."""
    raise SystemExit(f"sgl: {message}")


def _build_class():
    from lmms_eval.api.model import lmms
    from loguru import logger

    from sgl_cli.engine import Item, SglError, load_preset

    class SglModel(lmms):
        """lmms-eval's `sgl` model: generation requests answered by sgl's Engine."""

        is_simple = True

        def __init__(self, preset: str | None = None, calibration: str | None = None, no_exit: bool = False,
                     quantize: str | None = None, records: str | None = None, summary: str | None = None,
                     threads: int | None = None, **kwargs: Any) -> None:
            super().__init__()
            unknown = sorted(set(kwargs) - set(SETTINGS))
            if unknown:
                _fail(f"--model_args: unknown argument(s) {', '.join(unknown)}; sgl takes "
                      f"{', '.join(sorted(OWN + tuple(SETTINGS)))}")
            try:
                settings = {k: setting(k, v, SETTINGS[k]) for k, v in kwargs.items()}
                no_exit = setting("no_exit", no_exit, bool)
                threads = None if threads is None else setting("threads", threads, int)
                if threads is not None and threads < 1:
                    raise ValueError(f"threads={threads} must be at least 1")
            except ValueError as exc:
                _fail(f"--model_args: {exc}")
            self.records_path = Path(records) if records else None
            self.summary_path = Path(summary) if summary else None
            for what, path in (("records", self.records_path), ("summary", self.summary_path)):
                if path is not None and path.exists():
                    _fail(f"{what}={path} exists; give a new path (a run does not overwrite a file)")
                if path is not None and not path.parent.is_dir():
                    _fail(f"{what}={path}: folder {path.parent} does not exist")
            try:
                from sgl_cli.engine import Engine, random_weights_warning, resolve_calibration, use_threads

                chosen = load_preset(preset).with_settings(no_exit=no_exit, **settings)
                if quantize is not None:
                    chosen = chosen.with_quantize(str(quantize))
                chosen = resolve_calibration(chosen, "run", calibration, notify=logger.info,
                                             warn=logger.warning).preset
                use_threads(threads)
                self.engine = Engine.load(chosen)
            except SglError as exc:
                _fail(str(exc))
            if self.engine.random_weights:
                logger.warning(f"sgl: {random_weights_warning()}")
            self.preset = chosen
            self.stats: dict[str, TaskStats] = {}
            self._records_file = None

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            """As lmms-eval's, but its --batch_size (an int 1 when not given, a string when given) yields to
            --model_args' batch_size, and the preset's when neither is given; --device and --max_batch_size do not
            apply (the preset places the models)."""
            from lmms_eval import utils

            args = utils.simple_parse_args_string(arg_string)
            given = (additional_config or {}).get("batch_size")
            if "batch_size" not in args and isinstance(given, str):
                if not given.isdigit():
                    _fail(f"--batch_size {given}: sgl takes a number of items (or the preset's batch_size)")
                args["batch_size"] = int(given)
            return cls(**args)

        @property
        def batch_size(self) -> int:
            return self.engine.settings.batch_size

        def loglikelihood(self, requests):
            tasks = sorted({r.task_name for r in requests})
            _fail(f"task(s) {', '.join(tasks)} ask for loglikelihood requests; sgl answers generation tasks "
                  "(output_type: generate_until) only")

        def generate_until_multi_round(self, requests):
            tasks = sorted({r.task_name for r in requests})
            _fail(f"task(s) {', '.join(tasks)} ask for multi-round generation; sgl answers one-turn "
                  "generate_until tasks only")

        def generate_until(self, requests) -> list[str]:
            # Each task's requests in doc order, as `sgl run` reads the task's rows: the same batches.
            order = sorted(range(len(requests)), key=lambda i: (str(requests[i].args[4]), requests[i].args[3]))
            items, untils = [], []
            for i in order:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                item, until = self._item(context, gen_kwargs or {}, doc_to_visual, doc_id, task, split)
                items.append(item)
                untils.append(until)
            answers = [""] * len(requests)
            for n, (i, record) in enumerate(zip(order, self.engine.run(items))):
                task = str(requests[i].args[4])
                record = {**record, "task": task}
                self.stats.setdefault(task, TaskStats()).add(record)
                if record["error"]:
                    logger.error(f"sgl: task {task}: {record['error']}")
                else:
                    answers[i] = stop_at(record["answer"], untils[n])
                self._write_record(record)
            if self._records_file is not None:
                self._records_file.flush()
            self._report()
            return answers

        def _item(self, context, gen_kwargs: dict, doc_to_visual, doc_id: int, task: str, split: str):
            row = int(doc_id) + 1
            doc = self.task_dict[task][split][doc_id] if task in self.task_dict else None
            ident = doc.get("id", doc_id) if isinstance(doc, dict) else doc_id
            item = Item(line=row, id=ident, question=str(context), unit="row")
            where = f"{task} row {row}"
            try:
                item.images, item.video = media_refs(doc_to_visual(doc), where)
            except Exception as exc:  # a task's own function failed on this doc: this item's error, not the run's
                item.error = item.fail(f"{task}: doc_to_visual: {exc}")
            limit = gen_kwargs.get("max_new_tokens")
            if limit is not None:
                item.max_new_tokens = int(limit)
            return item, gen_kwargs.get("until")

        def _write_record(self, record: dict) -> None:
            if self.records_path is None:
                return
            if self._records_file is None:
                self._records_file = self.records_path.open("w", encoding="utf-8")
            self._records_file.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")

        def _report(self) -> None:
            summary = {task: s.to_dict() for task, s in self.stats.items()}
            print("sgl, per task (beside lmms-eval's metrics):\n" + table(summary), file=sys.stderr, flush=True)
            if self.summary_path is not None:
                about = {"preset": self.preset.name, "settings": dataclasses.asdict(self.preset.settings),
                         "tasks": summary}
                self.summary_path.write_text(json.dumps(about, indent=1) + "\n")

    SglModel.__qualname__ = "SglModel"  # as lmms-eval names it (CLASS_PATH)
    return SglModel


_CLASS = None


def __getattr__(name: str):
    global _CLASS
    if name == "SglModel":  # built on first use: lmms-eval is imported only when lmms-eval loads the model
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(name)
