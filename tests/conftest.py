"""Shared fixtures: the built-in pair at tiny size (hidden 64, 2 layers), built offline once per session."""

from __future__ import annotations

import contextlib
import importlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

torch.set_num_threads(1)  # 2-core machines: one thread per process is fastest and stable
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    from sgl_cli.engine.builtin.pair import ensure_pair

    return ensure_pair("tiny", tmp_path_factory.mktemp("cache"))


def write_preset(folder: Path, pair: dict[str, Path], **settings) -> Path:
    import yaml

    data = {
        "name": "tiny-test",
        "small": {"model": str(pair["small"]), "dtype": "float32", "attn": "sdpa"},
        "large": {"model": str(pair["large"]), "dtype": "float32", "attn": "sdpa"},
        "retain": 0.09,
        "consistency_retain": 0.05,
        "threshold": None,
        "max_new_tokens": 5,
        "prompt_suffix": "Answer with one word.",
    }
    data.update(settings)
    path = folder / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def preset_file(tmp_path, tiny_pair) -> Path:
    return write_preset(tmp_path, tiny_pair)


def make_images(folder: Path, sizes=((224, 224), (168, 280), (336, 224))) -> list[Path]:
    """Noise images of different sizes (so different visual-token counts), deterministic."""
    from PIL import Image

    paths = []
    rng = random.Random(0)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h))
        img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
        p = folder / f"img{i}.png"
        img.save(p)
        paths.append(p)
    return paths


def analyze(engine, items: list) -> list:
    """The small model's part for a batch, through the engine's public stages: `prepare`, then `small_pass`."""
    works = engine.prepare(items)
    engine.small_pass(works)
    return works


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def long_job(folder: Path, pair: dict[str, Path]) -> tuple[Path, Path, Path]:
    """(input, preset, its default output) of a run long enough to stop midway: 12 items, answers of 16 tokens."""
    imgs = make_images(folder)
    rows = [{"image": imgs[i % 3].name, "question": f"question {i}?"} for i in range(12)]
    return (write_jsonl(folder / "big.jsonl", rows), write_preset(folder, pair, max_new_tokens=16),
            folder / "big.sgl.jsonl")


@pytest.fixture
def batch(tmp_path) -> Path:
    imgs = make_images(tmp_path)
    questions = ["What color is the square?", "How many circles are there?", "What shape is red?"]
    rows = [{"image": p.name, "question": q, "answer": "red"} for p, q in zip(imgs, questions)]
    return write_jsonl(tmp_path / "batch.jsonl", rows)


@pytest.fixture(scope="session")
def engine_factory(tiny_pair):
    """Engines over one pair of loaded tiny models, with settings varied per test (models loaded once)."""
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec, Settings

    small = load_model(ModelSpec(str(tiny_pair["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32"), "large")

    def make(**settings) -> Engine:
        base = dict(threshold=None, max_new_tokens=5, prompt_suffix="Answer with one word.")
        base.update(settings)
        return Engine(Settings(**base), small, large)

    return make


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Callable[[str], Path]:
    """`example_site("backend-plugin")`: examples/backend-plugin installed with pip, offline, into a folder of its
    own (its dist-info carries the entry point, as a real install does), once per session; nothing is put on
    sys.path (`plugin_on_path` does that)."""
    sites: dict[str, Path] = {}

    def install(example: str) -> Path:
        if example not in sites:
            target = tmp_path_factory.mktemp(f"site-{example}")
            res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                  "--no-index", "--target", str(target), str(ROOT / "examples" / example)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            sites[example] = target
        return sites[example]

    return install


@contextlib.contextmanager
def plugin_on_path(site: Path, module: str, refresh: Callable[[], None]) -> Iterator[Path]:
    """An installed example plugin (`site`, holding the distribution named like its `module`) put on sys.path with
    its registry looked up again (`refresh`: guides.refresh and the like); removed again afterwards."""
    assert list(site.glob(f"{module}-*.dist-info/entry_points.txt"))
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    refresh()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(module, None)
        refresh()


@pytest.fixture(scope="module")
def echo(example_site) -> Iterator[Path]:
    """examples/backend-plugin (the `echo` large backend: answers from the kept tokens, no model) on sys.path for
    the module that asks for it."""
    from sgl_cli.engine import backends

    with plugin_on_path(example_site("backend-plugin"), "sgl_echo_backend", backends.refresh) as site:
        yield site


@pytest.fixture(scope="session")
def ray_cluster(example_site):
    """One local Ray instance for every test that needs one (starting it takes seconds). Its workers have
    examples/backend-plugin (`echo`) installed, as every node of a cluster needs the plugins a run names: Ray's
    runtime environment for the job puts its folder first on their PYTHONPATH. The driver (this process) sees it
    only where a test puts it on sys.path."""
    ray = pytest.importorskip("ray", reason="the Ray backend needs Ray Data: pip install 'sgl-cli[ray]'")
    pytest.importorskip("ray.data", reason="the Ray backend needs Ray Data: pip install 'sgl-cli[ray]'")
    runtime_env = {"py_modules": [f"local://{example_site('backend-plugin')}"]}
    for attempt in range(3):
        # Ray 2.60's raylet gives its helper processes 15 s to start; on a loaded 2-core machine they can miss
        # it (the raylet aborts). A second try finds their imports in the page cache.
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", runtime_env=runtime_env)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
