"""The one rule of the entry-point registries (engine/plugins.py), on a group of its own with dist-infos written
here: built-ins first, then plugins sorted by name; a plugin cannot replace a built-in nor an earlier plugin of the
same name; `last` built-ins come after the plugins; each failure is worded by the registry's own `fail`."""

from __future__ import annotations

import pytest

from sgl_cli.engine.plugins import Registry

GROUP = "sgl.test-registry"


def dist(folder, name: str, lines: list[str]) -> None:
    info = folder / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n" + "".join(line + "\n" for line in lines))


@pytest.fixture
def site(tmp_path, monkeypatch):
    dist(tmp_path, "zeta", ["zeta = json:JSONDecoder", "alpha = json:JSONEncoder", "dup = json:JSONDecoder"])
    dist(tmp_path, "beta", ["beta = pathlib:PurePath", "dup = pathlib:Path", "mid = os:stat_result"])
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def fail(problem, name, spec, exc):
    return LookupError(problem, name, spec, type(exc).__name__ if exc else None)


def test_order_and_no_replacing(site):
    reg = Registry(GROUP, {"mid": "pathlib:PurePosixPath", "first": "pathlib:PurePath", "end": "pathlib:Path"},
                   last=("end",))
    assert reg.names() == ["mid", "first", "alpha", "beta", "dup", "zeta", "end"]
    specs = reg.specs()
    assert specs["mid"] == "pathlib:PurePosixPath"  # the plugin's `mid` did not replace the built-in
    assert specs["dup"] in ("json:JSONDecoder", "pathlib:Path")  # one of them, once
    import json
    import pathlib

    assert reg.load("alpha", object, fail) is json.JSONEncoder
    assert reg.load("end", pathlib.PurePath, fail) is pathlib.Path


def test_failures_are_worded_by_the_registry(site):
    reg = Registry(GROUP, {"gone": "nowhere_at_all:X", "attr": "json:Nope"})
    with pytest.raises(LookupError) as e:
        reg.load("nope", object, fail)
    assert e.value.args == ("unknown", "nope", None, None)
    with pytest.raises(LookupError) as e:
        reg.load("gone", object, fail)
    assert e.value.args == ("import", "gone", "nowhere_at_all:X", "ModuleNotFoundError")
    with pytest.raises(LookupError) as e:
        reg.load("attr", object, fail)
    assert e.value.args == ("import", "attr", "json:Nope", "AttributeError")
    with pytest.raises(LookupError) as e:
        reg.load("zeta", int, fail)
    assert e.value.args == ("type", "zeta", "json:JSONDecoder", None)
    with pytest.raises(AttributeError):  # outside `catch`: raised as it is
        reg.load("attr", object, fail, catch=ImportError)


def test_refresh_sees_a_plugin_installed_later(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(GROUP, {"first": "pathlib:PurePath"})
    assert reg.names() == ["first"]
    dist(tmp_path, "late", ["late = json:JSONDecoder"])
    import importlib

    importlib.invalidate_caches()
    assert reg.names() == ["first"]  # read once
    reg.refresh()
    assert reg.names() == ["first", "late"]
