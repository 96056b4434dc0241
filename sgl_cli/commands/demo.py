"""`sgl demo DIR`: write the built-in pair, example images and a batch.jsonl to look at and run."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import domain_errors, err, with_help


def demo(
    folder: Path = typer.Argument(..., help="Folder to write into (created if missing).", show_default=False),
    n: int = typer.Option(8, "--n", min=1, help="Number of example items."),
    seed: int = typer.Option(0, "--seed", help="Seed for the example images and questions."),
) -> None:
    """Write the built-in model pair, N labelled shapes items and a preset for them into FOLDER.

    The items are fresh draws of the task the built-in pair was trained on (coloured shapes on noise,
    144-256 visual tokens; colour, shape, counting and two-hop relation questions, a `type` field on each):
    a different --seed gives items neither model has seen.

    Then: sgl run FOLDER/batch.jsonl --preset FOLDER/preset.yaml
      or: sgl eval FOLDER/batch.jsonl --preset FOLDER/preset.yaml
    """
    with domain_errors():
        import shutil

        import yaml

        from ..engine.builtin.pair import ensure_pair
        from ..engine.builtin.shapes import write_items
        from ..engine.preset import load_preset

        folder.mkdir(parents=True, exist_ok=True)
        pair = ensure_pair("default")
        preset = load_preset("default").to_dict()
        for role in ("small", "large"):
            target = folder / "models" / role
            shutil.copytree(pair[role], target, dirs_exist_ok=True)
            preset[role]["model"] = str(Path("models") / role)
        preset["name"] = "demo"
        preset["description"] = "The built-in pair, copied here by `sgl demo`."
        (folder / "preset.yaml").write_text(yaml.safe_dump(preset, sort_keys=False))
        batch = write_items(folder, n, seed)
        err(f"sgl: wrote {n} labelled items to {batch}, the pair to {folder / 'models'} and "
            f"{folder / 'preset.yaml'}")
        err(f"then: sgl run {batch} --preset {folder / 'preset.yaml'}")
        err(f"  or: sgl eval {batch} --preset {folder / 'preset.yaml'}")


with_help(demo)
