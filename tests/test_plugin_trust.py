"""Plugins are not trusted blindly (issue 32, item 3). Deliberately broken plugins, one per way of breaking, are
written here as small packages and installed with pip, offline, into folders of their own (their dist-infos carry
the entry points, as a real install does), then put on sys.path (the registry looked up again) or, for a real
process, on PYTHONPATH.

The rule, one for the three registries (guides, large backends, input formats) and every call across the plugin
boundary: a plugin that cannot load is left out with one warning naming it, and is an error (one line, exit 2,
before any model loads) only when it is asked for by name; what a plugin gives back is checked, and a violation is
an error record naming the plugin and the item: never a traceback, never a lost record."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine import backends, guides
from sgl_cli.engine.io import formats
from tests.conftest import make_images, plugin_on_path, write_jsonl, write_preset

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# -- the broken plugins ------------------------------------------------------------------------------------------
# dist (= its module) -> (the module's code, {entry-point group: {name: "module:attr"}})
PLUGINS: dict[str, tuple[str, dict[str, dict[str, str]]]] = {
    "sgl_fmt_gone": ('''
        """An input format whose dependency is not installed: importing it raises."""
        import sgl_no_such_dependency  # noqa: F401

        class Gone:
            pass
        ''', {"sgl.formats": {"gone": "sgl_fmt_gone:Gone"}}),
    "sgl_fmt_wrong": ('''
        """An input format registered with a class that is not a Format."""

        class NotAFormat:
            def recognise(self, path):
                return True
        ''', {"sgl.formats": {"wrong": "sgl_fmt_wrong:NotAFormat"}}),
    "sgl_fmt_nosy": ('''
        """An input format whose recognise raises, whatever the file."""
        from sgl_cli.engine.io.formats import Format

        class Nosy(Format):
            name = "nosy"

            def recognise(self, path):
                raise RuntimeError("cannot tell")
        ''', {"sgl.formats": {"nosy": "sgl_fmt_nosy:Nosy"}}),
    "sgl_fmt_readers": ('''
        """Input formats (sgl JSONL under another suffix each) whose readers break their contract mid-file."""
        from sgl_cli.engine.io.formats.jsonl import SglJsonl

        class _Suffix(SglJsonl):
            suffix = ""

            def recognise(self, path):
                return path.is_file() and path.suffix == self.suffix

        class Raises(_Suffix):  # raises after two items
            name, suffix = "raises", ".raises"

            def pairs(self, source):
                for n, pair in enumerate(super().pairs(source)):
                    if n == 2:
                        raise ValueError("the reader broke")
                    yield pair

        class Nones(_Suffix):  # gives None in place of its third pair, then goes on
            name, suffix = "nones", ".nones"

            def pairs(self, source):
                for n, pair in enumerate(super().pairs(source)):
                    yield None if n == 2 else pair

        class _Reordered(_Suffix):  # the file's pairs in `order`
            order = ()

            def pairs(self, source):
                pairs = list(super().pairs(source))
                for i in self.order:
                    yield pairs[i]

        class Shuffled(_Reordered):  # lines 1, 3, 2, 2
            name, suffix, order = "shuffled", ".shuffled", (0, 2, 1, 1)

        class Repeated(_Reordered):  # lines 1, 2, 2, 3
            name, suffix, order = "repeated", ".repeated", (0, 1, 1, 2)

        class BadParse(_Suffix):  # parse raises on line 2
            name, suffix = "badparse", ".badparse"

            def parse(self, source, number, payload):
                if number == 2:
                    raise KeyError("question")
                return super().parse(source, number, payload)
        ''', {"sgl.formats": {"raises": "sgl_fmt_readers:Raises", "nones": "sgl_fmt_readers:Nones",
                              "shuffled": "sgl_fmt_readers:Shuffled", "repeated": "sgl_fmt_readers:Repeated",
                              "badparse": "sgl_fmt_readers:BadParse"}}),
    "sgl_guide_gone": ('''
        """A guide whose dependency is not installed: importing it raises."""
        import sgl_no_such_dependency  # noqa: F401
        ''', {"sgl.guides": {"gone": "sgl_guide_gone:Gone"}}),
    "sgl_bad_guides": ('''
        """Guides that give back what a guide must not, for every item but the one on line 2."""
        import torch

        from sgl_cli.engine.guides import Guide


        def bad(item):
            return item.line != 2


        class _Ranked(Guide):
            def score(self, item):
                return torch.arange(item.n_visual, dtype=torch.float32)


        class Doubled(_Ranked):
            name = "doubled"

            def score(self, item):
                return torch.arange((2 if bad(item) else 1) * item.n_visual, dtype=torch.float32)


        class Columns(_Ranked):
            name = "columns"

            def score(self, item):
                return torch.ones(item.n_visual, 2) if bad(item) else super().score(item)


        class AllNan(_Ranked):
            name = "allnan"

            def score(self, item):
                return torch.full((item.n_visual,), float("nan")) if bad(item) else super().score(item)


        class OneNan(_Ranked):
            name = "onenan"

            def score(self, item):
                s = super().score(item)
                if bad(item):
                    s[3] = float("nan")
                return s


        class _Kept(_Ranked):
            def kept(self, n):
                raise NotImplementedError

            def keep(self, model, item, scores, retain):
                return self.kept(item.n_visual) if bad(item) else super().keep(model, item, scores, retain)


        class Negative(_Kept):
            name = "negative"

            def kept(self, n):
                return torch.tensor([-1, 0, 1])


        class Duplicated(_Kept):
            name = "duplicated"

            def kept(self, n):
                return torch.tensor([0, 1, 1, 2])


        class Unsorted(_Kept):
            name = "unsorted"

            def kept(self, n):
                return torch.tensor([0, 2, 1])


        class Empty(_Kept):
            name = "empty"

            def kept(self, n):
                return torch.zeros(0, dtype=torch.long)


        class Beyond(_Kept):  # every index twice over: "retained_tokens 384 of 192"
            name = "beyond"

            def kept(self, n):
                return torch.arange(2 * n)


        class Fractional(_Kept):
            name = "fractional"

            def kept(self, n):
                return torch.tensor([0.0, 1.0])
        ''', {"sgl.guides": {name: f"sgl_bad_guides:{cls}" for name, cls in (
            ("doubled", "Doubled"), ("columns", "Columns"), ("allnan", "AllNan"), ("onenan", "OneNan"),
            ("negative", "Negative"), ("duplicated", "Duplicated"), ("unsorted", "Unsorted"), ("empty", "Empty"),
            ("beyond", "Beyond"), ("fractional", "Fractional"))}}),
    "sgl_backend_gone": ('''
        """A large backend whose engine is not installed: importing it raises ImportError."""
        import sgl_no_such_engine  # noqa: F401
        ''', {"sgl.backends": {"gone": "sgl_backend_gone:Gone"}}),
    "sgl_backend_boom": ('''
        """A large backend whose module fails on import with something other than ImportError."""
        raise RuntimeError("the driver is too old")
        ''', {"sgl.backends": {"boom": "sgl_backend_boom:Boom"}}),
    "sgl_backend_crash": ('''
        """A large backend whose load raises."""
        from sgl_cli.engine.backends.base import LargeBackend


        class Crash(LargeBackend):
            name = "crash"

            @classmethod
            def load(cls, spec, role="large", options=None):
                raise RuntimeError("no device for crash")
        ''', {"sgl.backends": {"crash": "sgl_backend_crash:Crash"}}),
    "sgl_backend_short": ('''
        """A large backend (transformers underneath) whose generate gives one answer fewer than it was asked for."""
        from sgl_cli.engine.backends.transformers import TransformersLarge
        from sgl_cli.engine.core.generate import Generation


        class Short(TransformersLarge):
            name = "short"

            def generate(self, works, inputs, kept, k, limits):
                gen = super().generate(works, inputs, kept, k, limits)
                return Generation(gen.tokens[:-1], gen.probs[:-1])
        ''', {"sgl.backends": {"short": "sgl_backend_short:Short"}}),
}
REFRESH = {"sgl.formats": formats.refresh, "sgl.guides": guides.refresh, "sgl.backends": backends.refresh}


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """`sites(dist)`: the broken plugin `dist` installed with pip, offline, into a folder of its own (once)."""
    done: dict[str, Path] = {}

    def install(dist: str) -> Path:
        if dist not in done:
            code, entry_points = PLUGINS[dist]
            root = tmp_path_factory.mktemp(dist)
            project = root / "src"
            project.mkdir()
            (project / f"{dist}.py").write_text(textwrap.dedent(code).lstrip())
            groups = "".join(f'\n[project.entry-points."{group}"]\n' + "".join(f'{k} = "{v}"\n' for k, v in eps.items())
                             for group, eps in entry_points.items())
            (project / "pyproject.toml").write_text(
                '[build-system]\nrequires = ["hatchling>=1.25"]\nbuild-backend = "hatchling.build"\n\n'
                f'[project]\nname = "{dist.replace("_", "-")}"\nversion = "0.1.0"\n{groups}\n'
                f'[tool.hatch.build.targets.wheel]\ninclude = ["{dist}.py"]\n')
            target = root / "site"
            res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                  "--no-index", "--target", str(target), str(project)], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr
            done[dist] = target
        return done[dist]

    return install


@contextlib.contextmanager
def installed(sites, *dists: str) -> Iterator[None]:
    """The plugins `dists` on sys.path, their registries looked up again; removed afterwards."""
    with contextlib.ExitStack() as stack:
        for dist in dists:
            (group,) = PLUGINS[dist][1]
            stack.enter_context(plugin_on_path(sites(dist), dist, REFRESH[group]))
        yield


def pythonpath(sites, *dists: str) -> dict:
    """The environment of a real `sgl` process with the plugins `dists` installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*(str(sites(d)) for d in dists), str(ROOT)]),
            "COLUMNS": "200"}


QUESTIONS = ["What color is the square?", "How many circles are there?", "What shape is red?"]


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path)


def write_items(path: Path, images: list[Path], n: int = 3) -> Path:
    return write_jsonl(path, [{"image": images[i % 3].name, "question": f"{QUESTIONS[i % 3]} ({i + 1})",
                               "answer": "red"} for i in range(n)])


@pytest.fixture
def batch(tmp_path, images) -> Path:
    return write_items(tmp_path / "batch.jsonl", images)


@pytest.fixture
def preset(tmp_path, tiny_pair) -> Path:
    return write_preset(tmp_path, tiny_pair, max_new_tokens=2)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: refusals come before it."""
    from sgl_cli.engine.backends import transformers as hf_backend

    monkeypatch.setattr(hf_backend, "load_model", lambda *a, **k: pytest.fail("a model loaded"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def said(stderr: str) -> list[str]:
    """stderr's lines, but the tiny pair's warning that its weights are random."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and "random weights" not in line]


def one_line(stderr: str) -> str:
    lines = said(stderr)
    assert len(lines) == 1, stderr
    return lines[0]


# -- input formats: loading and recognising ------------------------------------------------------------------------
def test_a_format_plugin_that_cannot_load_is_left_out_with_a_warning(sites, batch):
    """Issue 32: one input-format plugin that cannot import made every run refuse every input, sgl JSONL
    included. It is left out of recognition, with one warning naming it and why; so is one whose class is not a
    Format."""
    from sgl_cli.engine.io.formats import open_source, read_items
    from sgl_cli.engine.plugins import PluginWarning

    with installed(sites, "sgl_fmt_gone", "sgl_fmt_wrong"):
        assert formats.format_names() == ["dataset", "parquet", "gone", "wrong", "openai", "sgl"]
        with pytest.warns(PluginWarning) as caught:
            source = open_source(batch)
        assert source.kind == "sgl"
        assert [str(w.message) for w in caught] == [
            "input format plugin 'gone' (sgl_fmt_gone:Gone) cannot be loaded, left out: ModuleNotFoundError: No "
            "module named 'sgl_no_such_dependency'",
            "input format plugin 'wrong' (sgl_fmt_wrong:NotAFormat) is not a subclass of Format, left out"]
        with pytest.warns(PluginWarning):
            assert [i.question for i in read_items(batch)] == [f"{q} ({i + 1})" for i, q in enumerate(QUESTIONS)]


def test_sgl_run_warns_once_and_reads_jsonl_with_a_format_plugin_that_cannot_load(sites, batch, preset, tmp_path):
    """In a real process: the run goes on, each broken plugin named once on stderr, no traceback."""
    out = tmp_path / "out.jsonl"
    res = subprocess.run([sys.executable, "-m", "sgl_cli", "run", str(batch), "--preset", str(preset), "--out",
                          str(out), "-q"], capture_output=True, text=True,
                         env=pythonpath(sites, "sgl_fmt_gone", "sgl_fmt_wrong"))
    assert res.returncode == 0, res.stderr
    assert said(res.stderr) == [
        "sgl: warning: input format plugin 'gone' (sgl_fmt_gone:Gone) cannot be loaded, left out: "
        "ModuleNotFoundError: No module named 'sgl_no_such_dependency'",
        "sgl: warning: input format plugin 'wrong' (sgl_fmt_wrong:NotAFormat) is not a subclass of Format, left out"]
    got = records(out)
    assert [r["line"] for r in got] == [1, 2, 3] and all(r["error"] is None for r in got)


def test_a_format_plugin_whose_recognise_raises_is_not_recognising(sites, batch, preset, tmp_path):
    """Issue 32: a plugin's `recognise` raising gave a traceback on any input. It is taken as "not recognised",
    with a warning naming it."""
    from sgl_cli.engine.io.formats import open_source
    from sgl_cli.engine.plugins import PluginWarning

    with installed(sites, "sgl_fmt_nosy"):
        with pytest.warns(PluginWarning) as caught:
            assert open_source(batch).kind == "sgl"
        assert [str(w.message) for w in caught] == [
            "input format plugin 'nosy': recognise raised RuntimeError: cannot tell; taken as not recognising "
            "batch.jsonl"]
        out = tmp_path / "out.jsonl"
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset), "--out", str(out), "-q"])
        assert res.exit_code == 0, res.output
        assert said(res.stderr) == ["sgl: warning: input format plugin 'nosy': recognise raised RuntimeError: "
                                           "cannot tell; taken as not recognising batch.jsonl"]
        assert [r["line"] for r in records(out)] == [1, 2, 3]


# -- input formats: what a reader gives -----------------------------------------------------------------------------
READER_FAILURES = {
    # plugin: (items in the file, the lines recorded before it broke, what the error says after the plugin's name)
    "raises": (3, [1, 2], "reading data.raises failed after line 2: ValueError: the reader broke"),
    "nones": (7, [1, 2], "data.nones: after line 2 its reader gave None, not a (line number, payload) pair"),
    "shuffled": (3, [1, 3], "data.shuffled: line 2 comes after line 3 (line numbers must increase)"),
    "repeated": (3, [1, 2], "data.repeated: line 2 comes after line 2 (line numbers must increase)"),
}


@pytest.mark.parametrize("plugin", list(READER_FAILURES))
def test_a_reader_that_breaks_mid_file_keeps_the_records_before_and_names_itself(sites, images, preset, tmp_path,
                                                                                  plugin):
    """Issue 32: a reader raising or giving None mid-file gave a traceback and lost the records of the items read
    before it (0 of 3, 2 of 7 written); item numbers out of order or repeated were written as they came (lines 1,
    3, 2, 2). The items before the break get their records, in order, then the run stops with one line naming the
    plugin, the file and the line (exit 2); --resume keeps them and stops at the same place."""
    n, lines, why = READER_FAILURES[plugin]
    data = write_items(tmp_path / f"data.{plugin}", images, n)
    out = tmp_path / "out.jsonl"
    message = (f"sgl: error: input format plugin {plugin!r}: {why}; the records of the {len(lines)} items before "
               f"it are in {out}")
    with installed(sites, "sgl_fmt_readers"):
        res = runner.invoke(app, ["run", str(data), "--preset", str(preset), "--out", str(out), "-q"])
        assert res.exit_code == 2, res.output
        assert one_line(res.stderr) == message
        got = records(out)
        assert [r["line"] for r in got] == lines and all(r["error"] is None for r in got)
        assert [r["id"] for r in got] == lines

        res = runner.invoke(app, ["run", str(data), "--preset", str(preset), "--out", str(out), "--resume", "-q"])
        assert res.exit_code == 2, res.output
        assert one_line(res.stderr) == message
        assert records(out) == got  # nothing lost, nothing twice


def test_a_reader_that_breaks_mid_file_through_the_library(sites, images, engine_factory, tmp_path):
    """`engine.run(read_items(...))`: the records of the items read before the break come out, then the one-line
    InputError, not the error alone."""
    from sgl_cli.engine.io.formats import InputError, read_items

    data = write_items(tmp_path / "data.raises", images)
    got = []
    with installed(sites, "sgl_fmt_readers"):
        with pytest.raises(InputError, match=r"^input format plugin 'raises': reading data.raises failed after "
                                             r"line 2: ValueError: the reader broke$"):
            for record in engine_factory(retain=0.25).run(read_items(data)):
                got.append(record)
    assert [r["line"] for r in got] == [1, 2] and all(r["error"] is None for r in got)


def test_the_ray_backends_input_batches_end_where_the_reader_broke(sites, images, tmp_path):
    """The Ray backend cuts the input into batches on the driver: the items before the break are batched (their
    records come back), and the error is kept to raise after them."""
    import pickle

    from sgl_cli.engine.io.formats import InputError, open_source
    from sgl_cli.engine.runs.ray_backend import input_batches

    data = write_items(tmp_path / "data.raises", images)
    with installed(sites, "sgl_fmt_readers"):
        failed: list = []
        got = input_batches(open_source(data), 0, 1, failed)
        assert [[line for line, _ in batch] for batch in got] == [[1], [2]]
        assert [json.loads(pickle.loads(payload))["question"] for batch in got for _, payload in batch] == [
            f"{QUESTIONS[0]} (1)", f"{QUESTIONS[1]} (2)"]
        assert [type(e) for e in failed] == [InputError] and str(failed[0]).startswith(
            "input format plugin 'raises': reading data.raises failed after line 2")


def test_a_parse_that_raises_is_its_items_error_record(sites, images, preset, tmp_path):
    data = write_items(tmp_path / "data.badparse", images)
    out = tmp_path / "out.jsonl"
    with installed(sites, "sgl_fmt_readers"):
        res = runner.invoke(app, ["run", str(data), "--preset", str(preset), "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output
    got = records(out)
    assert [r["line"] for r in got] == [1, 2, 3]
    assert [r["error"] for r in got] == [
        None, "line 2: input format plugin 'badparse': parse raised KeyError: 'question'", None]


# -- large backends ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist, name, why", [
    ("sgl_backend_gone", "gone", "No module named 'sgl_no_such_engine'"),  # (this one was one line already)
    ("sgl_backend_boom", "boom", "RuntimeError: the driver is too old"),
])
def test_a_backend_plugin_that_cannot_import_is_one_line_before_any_model_loads(sites, batch, preset, no_model_loads,
                                                                                dist, name, why):
    """Issue 32: a backend plugin that cannot import gave a traceback (a guide's was one line)."""
    with installed(sites, dist):
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset), "--large-backend", name, "-q"])
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == (f"sgl: error: --large-backend: cannot import large backend {name!r} "
                                    f"({dist}:{name.title()}): {why}")


def test_a_backend_plugin_whose_load_raises_is_one_line(sites, batch, preset):
    """Issue 32: a backend plugin whose `load` raised gave a traceback."""
    with installed(sites, "sgl_backend_crash"):
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset), "--large-backend", "crash", "-q"])
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == ("sgl: error: large backend plugin 'crash': load raised RuntimeError: no device "
                                    "for crash")
    assert not (batch.parent / "batch.sgl.jsonl").exists()


def test_a_backend_that_gives_fewer_answers_than_items_fails_those_items(sites, batch, preset, tmp_path):
    """Issue 32: a backend whose generate returned fewer answers than items gave a traceback and no output at all.
    Each item is an error record naming the plugin (a batch that fails is retried item by item; the plugin gives
    one answer fewer every time)."""
    out = tmp_path / "out.jsonl"
    with installed(sites, "sgl_backend_short"):
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset), "--large-backend", "short",
                                  "--out", str(out), "-q"])
    assert res.exit_code == 1, res.output
    got = records(out)
    assert [r["line"] for r in got] == [1, 2, 3]
    assert [r["error"] for r in got] == [f"line {n}: large backend plugin 'short': generate gave 0 answers for 1 item"
                                         for n in (1, 2, 3)]
    assert all(r["large_backend"] == "short" and r["answer"] is None for r in got)


# -- guides --------------------------------------------------------------------------------------------------------
GUIDE_FAILURES = {
    # guide: what its error says of an item with n visual tokens
    "doubled": lambda n: f"scores have {2 * n} values for {n} visual tokens",
    "columns": lambda n: f"scores have shape ({n}, 2); one per visual token is ({n},)",
    "allnan": lambda n: f"scores are not finite (NaN or infinite) at {n} of {n} visual tokens",
    "onenan": lambda n: f"scores are not finite (NaN or infinite) at 1 of {n} visual tokens",
    "negative": lambda n: f"kept index -1 is not one of the {n} visual tokens (0 to {n - 1})",
    "duplicated": lambda n: "kept index 1 is kept twice",
    "unsorted": lambda n: "kept indices are not in increasing order (2 before 1)",
    "empty": lambda n: "kept no visual token (a guide keeps one at least)",
    "beyond": lambda n: f"kept index {n} is not one of the {n} visual tokens (0 to {n - 1})",
    "fractional": lambda n: "kept indices are torch.float32, not integers",
}


@pytest.fixture(scope="module")
def visual_tokens(engine_factory, tmp_path_factory) -> Iterator[dict]:
    """The three items' visual-token counts, from the random guide."""
    from sgl_cli.engine.io.formats import read_items

    folder = tmp_path_factory.mktemp("counts")
    data = write_items(folder / "batch.jsonl", make_images(folder))
    recs = list(engine_factory(guide="random", retain=0.25, max_new_tokens=1).run(read_items(data)))
    return {r["line"]: r["visual_tokens"] for r in recs}


@pytest.mark.parametrize("guide", list(GUIDE_FAILURES))
def test_what_a_guide_gives_back_is_checked(sites, engine_factory, batch, visual_tokens, guide):
    """Issue 32: a guide plugin's scores of the wrong length or shape, all-NaN, or kept indices negative,
    duplicated, unsorted, empty or beyond the visual tokens were used silently (a record said `retained_tokens`
    384 of 192). Each item it breaks the contract for is an error record naming the plugin; its neighbour (line
    2, which it ranks properly) is answered as ever."""
    from sgl_cli.engine.guides.base import n_keep
    from sgl_cli.engine.io.formats import read_items

    with installed(sites, "sgl_bad_guides"):
        got = list(engine_factory(guide=guide, retain=0.25, max_new_tokens=2).run(read_items(batch)))
    assert [r["line"] for r in got] == [1, 2, 3]
    for r in got:
        n = visual_tokens[r["line"]]
        if r["line"] == 2:
            assert r["error"] is None and r["guide"] == guide
            assert (r["visual_tokens"], r["retained_tokens"]) == (n, n_keep(n, 0.25))
        else:
            assert r["error"] == f"line {r['line']}: guide plugin {guide!r}: {GUIDE_FAILURES[guide](n)}"
            assert r["retained_tokens"] is None


def test_sgl_run_with_a_guide_keeping_beyond_the_visual_tokens(sites, batch, preset, tmp_path, visual_tokens):
    """The issue's repro on the command line: no record says `retained_tokens` 384 of 192."""
    out = tmp_path / "out.jsonl"
    with installed(sites, "sgl_bad_guides"):
        res = runner.invoke(app, ["run", str(batch), "--preset", str(preset), "--guide", "beyond", "--out", str(out),
                                  "-q"])
    assert res.exit_code == 1, res.output
    got = records(out)
    assert [r["error"] for r in got] == [
        None if n == 2 else f"line {n}: guide plugin 'beyond': " + GUIDE_FAILURES["beyond"](visual_tokens[n])
        for n in (1, 2, 3)]
    assert all(r["retained_tokens"] is None or r["retained_tokens"] <= r["visual_tokens"] for r in got)


def test_sgl_eval_leaves_out_the_items_a_guide_breaks_the_contract_for(sites, batch, preset, visual_tokens):
    """`sgl eval`'s comparison confines a guide's violation to its items (left out, named), and compares the
    rest."""
    with installed(sites, "sgl_bad_guides"):
        res = runner.invoke(app, ["eval", str(batch), "--preset", str(preset), "--guide", "doubled,random",
                                  "--retain", "0.25", "--json", "-q"])
    assert res.exit_code == 1, res.output
    assert said(res.stderr) == [
        f"sgl: left out line {n}: guide plugin 'doubled': " + GUIDE_FAILURES["doubled"](visual_tokens[n])
        for n in (1, 3)]
    out = json.loads(res.stdout)
    assert out["items"] == 1
    assert [(r["guide"], r["retain"]) for r in out["results"]] == [("doubled", 0.25), ("random", 0.25)]


GONE_WARNING = ("sgl: warning: guide plugin 'gone' (sgl_guide_gone:Gone) cannot be loaded, left out: "
                "ModuleNotFoundError: No module named 'sgl_no_such_dependency'")


def test_sgl_eval_and_inspect_all_leave_out_a_guide_plugin_that_cannot_load(sites, batch, preset, tmp_path):
    """Issue 32: one guide plugin that cannot import stopped `sgl eval` (all guides by default) and `sgl inspect
    --guide all`. It is left out with one warning naming it."""
    with installed(sites, "sgl_guide_gone"):
        assert "gone" in guides.guide_names()  # listed by name (its metadata), as every command's --help shows
        res = runner.invoke(app, ["eval", str(batch), "--preset", str(preset), "--retain", "0.25", "--limit", "1",
                                  "--json", "-q"])
        assert res.exit_code == 0, res.output
        assert said(res.stderr) == [GONE_WARNING]
        assert [r["guide"] for r in json.loads(res.stdout)["results"]] == ["sgl", "cls", "fastv", "random",
                                                                            "downsample"]
        (image,) = make_images(tmp_path, sizes=((224, 224),))
        res = runner.invoke(app, ["inspect", str(image), "--question", "What is red?", "--preset", str(preset),
                                  "--guide", "all", "--json"])
        assert res.exit_code == 0, res.output
        assert said(res.stderr) == [GONE_WARNING]
        assert list(json.loads(res.stdout)["guides"]) == ["sgl", "cls", "fastv", "random"]


@pytest.mark.parametrize("command", ["run", "eval", "inspect"])
def test_a_guide_plugin_that_cannot_load_is_an_error_when_named(sites, batch, preset, no_model_loads, command):
    """Asked for by name, it is one line, exit 2, before any model loads."""
    args = ["inspect", str(make_images(batch.parent, sizes=((224, 224),))[0]), "--question", "What is red?"] \
        if command == "inspect" else [command, str(batch)]
    with installed(sites, "sgl_guide_gone"):
        res = runner.invoke(app, [*args, "--preset", str(preset), "--guide", "gone"])
    assert res.exit_code == 2, res.output
    assert one_line(res.stderr) == ("sgl: error: guide 'gone' (sgl_guide_gone:Gone) cannot be loaded: "
                                    "ModuleNotFoundError: No module named 'sgl_no_such_dependency'")
