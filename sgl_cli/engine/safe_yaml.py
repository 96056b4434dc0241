"""Reading the YAML files users hand sgl (presets, calibration files), within bounds.

`yaml.safe_load` builds no arbitrary objects, but it will still expand an alias bomb (a few lines whose aliases
nest into billions of values) until memory runs out, recurse past Python's limit on deep nesting, and quote a
whole huge value in its error. Here the file's size is capped, its node graph is composed first and measured
(expanded size and depth) before any value is built, and errors are one short line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20  # presets and calibration files are a few KB
MAX_NODES = 100_000  # values after expanding aliases
MAX_DEPTH = 64


class YamlError(ValueError):
    """Why a YAML file cannot be read (one line, naming the file)."""


def load_yaml(path: str | Path) -> Any:
    import yaml

    path = Path(path)
    data = _read(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters (NUL, most controls) here
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise YamlError(f"{path}: holds an unreadable character {_char(exc.character)} at line {line}, column "
                        f"{column}: YAML allows only printable characters") from None
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlError(f"{path}: nested too deeply") from None
        except yaml.YAMLError as exc:
            raise YamlError(f"{path}: not valid YAML: {_short(exc)}") from None
        if node is None:
            return None
        _measure(node, path)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise YamlError(f"{path}: not valid YAML: {_short(exc)}") from None
    finally:
        loader.dispose()


def _read(path: Path) -> bytes:
    """The file's first MAX_BYTES + 1 bytes, refusing what is not a regular file before reading: a folder, or a
    FIFO or device (/dev/zero), which would block or never end. Opened without blocking, then checked."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except IsADirectoryError:
        raise YamlError(f"{path} is a folder, not a YAML file") from None
    except FileNotFoundError:
        raise YamlError(f"{path} not found") from None
    except OSError as exc:
        raise YamlError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise YamlError(f"{path} is a folder, not a YAML file")
        if not stat.S_ISREG(mode):
            what = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if (
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
            raise YamlError(f"{path} is {what}, not a regular file: give a YAML file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise YamlError(f"{path}: over {MAX_BYTES >> 20} MiB, too large for a settings file")
    return data


def _char(code: int) -> str:
    return "NUL (\\0)" if code == 0 else f"U+{code:04X}"


def _measure(root, path: Path) -> None:
    """Refuse a node graph that expands past MAX_NODES values or nests past MAX_DEPTH (aliases counted as often as
    they are used: that is what constructing it would build)."""
    import yaml

    sizes: dict[int, int] = {}
    depth: dict[int, int] = {}

    def visit(node, level: int) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key], depth[key]
        if level > MAX_DEPTH:
            raise YamlError(f"{path}: nested more than {MAX_DEPTH} levels deep")
        sizes[key], depth[key] = 1, 1  # a cycle (a recursive alias) counts once; construction would refuse it
        size, deep = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _unique_keys(node, path)
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            s, d = visit(child, level + 1)
            size += s
            deep = max(deep, d + 1)
            if size > MAX_NODES:
                raise YamlError(f"{path}: its aliases expand to over {MAX_NODES:,} values (an alias bomb?)")
        sizes[key], depth[key] = size, deep
        return size, deep

    visit(root, 1)


def _unique_keys(node, path: Path) -> None:
    """Refuse a mapping that gives a key twice (YAML forbids it; PyYAML would silently keep the last value)."""
    import yaml

    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in seen:
            name = key.value if len(key.value) <= 40 else key.value[:37] + "..."
            where = f"line {line}" if seen[key.tag, key.value] == line else \
                f"lines {seen[key.tag, key.value]} and {line}"
            raise YamlError(f"{path}: key {name!r} given twice in one mapping ({where}); keep one")
        seen[key.tag, key.value] = line


def _short(exc: Exception) -> str:
    """A YAML error in one line, without the file excerpt it quotes."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
