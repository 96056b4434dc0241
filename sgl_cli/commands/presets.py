"""`sgl presets [NAME]`: list the shipped presets, or print one as YAML to copy and edit."""

from __future__ import annotations

from typing import Optional

import typer

from ._common import domain_errors, with_help


def presets(
    name: Optional[str] = typer.Argument(None, help="A preset to print as YAML (default: list them all).",
                                         show_default=False),
) -> None:
    """List the shipped presets: name, small and large model, guide and retain.

    With NAME, print that preset's file (comments included), ready to save, edit and pass as --preset FILE.
    """
    with domain_errors():
        from ..engine.errors import PresetError
        from ..engine.preset import available_presets, load_preset

        shipped = available_presets()
        if name is not None:
            if name not in shipped:
                raise PresetError(f"unknown preset {name!r}; available: {', '.join(shipped) or 'none'}")
            load_preset(name)  # a shipped file that does not parse is an error here too
            typer.echo(shipped[name].read_text(), nl=False)
            return
        rows = []
        for key in shipped:
            p = load_preset(key)
            rows.append((key, p.small.model if p.small else "-", p.large.model, p.settings.guide,
                         f"{p.settings.retain:g}"))
        header = ("name", "small", "large", "guide", "retain")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


with_help(presets)
