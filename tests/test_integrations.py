"""sgl_cli/integrations (sgl inside other tools) stays above the library: it imports only sgl_cli.engine's public
API, and its host tool only inside functions (importing the module needs no lmms-eval). lmms-eval itself runs in
tests_vllm/test_lmms_eval.py, in the vLLM environment."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

INTEGRATIONS = Path(__file__).resolve().parents[1] / "sgl_cli" / "integrations"


def test_integrations_use_only_the_public_api_and_import_their_host_lazily():
    for path in INTEGRATIONS.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}:{node.lineno}: relative import"
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("sgl_cli"):
                    assert name == "sgl_cli.engine", f"{path.name}:{node.lineno}: imports {name}"
                if name.split(".")[0] in ("lmms_eval", "loguru", "torch", "PIL"):
                    assert id(node) not in top, f"{path.name}:{node.lineno}: imports {name} at the top"


def test_the_lmms_eval_module_imports_neither_lmms_eval_nor_torch():
    code = ("import sys, sgl_cli.integrations.lmms_eval as m; "
            "print(sorted(n for n in ('lmms_eval', 'torch', 'loguru') if n in sys.modules), m.CLASS_PATH)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "sgl_cli.integrations.lmms_eval.SglModel"]


def test_stop_strings_cut_the_answer_at_the_first():
    from sgl_cli.integrations.lmms_eval import stop_at

    assert stop_at("red\n\nblue", ["\n\n"]) == "red"
    assert stop_at("red. blue\nx", [".", "\n"]) == "red"
    assert stop_at("red", None) == "red"
    assert stop_at("red", "") == "red"
    assert stop_at("a</s>b", "</s>") == "a"


def test_summary_counts_as_sgl_run_does():
    from sgl_cli.integrations.lmms_eval import summarize, table

    recs = [{"error": None, "exit": "small", "retained_tokens": 0},
            {"error": None, "exit": "large", "retained_tokens": 10},
            {"error": None, "exit": "large", "retained_tokens": 15},
            {"error": "row 4: no image", "exit": None, "retained_tokens": None}]
    got = summarize({"t": recs, "u": recs[3:]})
    assert got["t"] == {"items": 4, "errors": 1, "small_exits": 1, "large_calls": 2, "exit_share": 1 / 3,
                        "mean_retained_tokens": 12.5}
    assert got["u"] == {"items": 1, "errors": 1, "small_exits": 0, "large_calls": 0, "exit_share": None,
                        "mean_retained_tokens": None}
    lines = table(got).splitlines()
    assert lines[0].split() == ["task", "items", "errors", "exit", "share", "mean", "kept", "tokens"]
    assert lines[1].split() == ["t", "4", "1", "0.333", "12.5"]
    assert lines[2].split() == ["u", "1", "1", "-", "-"]
