"""The retain values a calibration chooses from (light: no numpy, so that `sgl --help` can name them)."""

from __future__ import annotations

from collections.abc import Sequence

# `--retain auto`: 1 (the large model alone, computed anyway, so free) down to about 3% of the visual tokens.
AUTO_RETAINS = (1.0, 0.5, 0.25, 0.15, 0.09, 0.05, 0.03)


def parse_retains(values: Sequence[str | float]) -> list[float]:
    """`auto` or retain values (strings or numbers) -> distinct retains, descending; ValueError naming a bad one."""
    retains: set[float] = set()
    for value in values:
        if isinstance(value, str) and value.strip().lower() == "auto":
            retains.update(AUTO_RETAINS)
            continue
        try:
            r = float(value)
        except ValueError:
            raise ValueError(f"retain {value!r} is neither a number nor auto") from None
        if not 0 < r <= 1:
            raise ValueError(f"retain {value} is not in (0, 1]")
        retains.add(r)
    if not retains:
        raise ValueError("no retain values given")
    return sorted(retains, reverse=True)
