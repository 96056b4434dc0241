"""The output record of one item: what `sgl run` writes (docs/cli.md lists the fields)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .stages import Work


def make_record(engine, w: Work, total_ms: float = 0.0) -> dict:
    """The record of `w` after `engine` ran it: the answer and how it was reached, or the item's error."""
    item = w.item
    rec: dict[str, Any] = {"id": item.id, "line": item.line, "guide": engine.guide.name}
    k = engine.prune_layer()
    if w.ok:
        exited = engine.exits(w)
        small = w.small
        n_visual = w.encoded.n_visual
        kept = 0 if exited else w.large.n_kept
        layers = engine.large.num_layers
        answerer, tokens = (engine.small, small.tokens) if exited else (engine.large, w.large.tokens)
        stopped = bool(tokens) and tokens[-1] in answerer.eos_ids
        rec.update(
            answer=small.answer if exited else w.large.answer,
            exit="small" if exited else "large",
            # Unrounded: the exit decision is `exit_score >= threshold` on exactly this number.
            exit_score=_finite(small.exit_score) if small else None,
            confidence=_finite(small.confidence) if small else None,
            consistency=_finite(small.consistency) if small else None,
            small_answer=small.answer if small else None,
            visual_tokens=n_visual,
            retained_tokens=kept,
            prune_layer=k,
            token_ratio=round((k + (layers - k) * kept / n_visual) / layers, 6),
            finish_reason="stop" if stopped else "length",
            usage={"prompt_tokens": int(w.encoded.large["input_ids"].shape[1]),
                   "completion_tokens": len(tokens) - stopped},
        )
    else:
        rec.update(answer=None, exit=None, exit_score=None, confidence=None, consistency=None,
                   small_answer=None, visual_tokens=None, retained_tokens=None, prune_layer=k,
                   token_ratio=None, finish_reason=None, usage=None)
    rec["large_quantize"] = engine.large.spec.quantize  # "nf4", "8bit" or None: how the large model's weights ran
    rec.update(engine.large.describe())  # large_backend: what ran the large model
    rec["ms"] = {"small": round(w.ms["small"], 1), "large": round(w.ms["large"], 1),
                 "total": round(total_ms, 1)}
    if item.has_reference:
        rec["reference"] = item.reference
    if item.custom_id is not None:
        rec["custom_id"] = item.custom_id
    rec["error"] = w.error
    if engine.save_scores and w.ok:
        rec[SCORES_KEY] = _scores(engine, w, exited)
    return rec


# The key under which a record carries its ranking to the `--save-scores` writer, which takes it off the record.
SCORES_KEY = "_scores"


def token_grids(engine, w: Work, reduced=None) -> list:
    """`w`'s images as the large model's token grids (as `sgl inspect` draws them), or those of what it saw when a
    guide reduced its input (`reduced`: a `Reduced`); [] for a layout the family cannot draw (the scores are
    then saved without their grid)."""
    m = engine.large
    try:
        if reduced is not None:
            return reduced.grids(m)
        return m.family.token_grids(m.model, w.encoded.large, w.encoded.image_sizes, m.processor)
    except ValueError:
        return []


def _scores(engine, w: Work, exited: bool) -> dict:
    from ..io.scores import score_payload

    if exited:
        return score_payload(w.small.importance.float(), [], token_grids(engine, w))
    grids = token_grids(engine, w, w.large.reduced)
    if w.large.reduced is not None:  # nothing ranked: the file says every token of what it saw was kept
        n = w.large.reduced.n_visual
        return score_payload(torch.ones(n), torch.arange(n), grids)
    return score_payload(w.large.scores.float(), w.large.kept, grids)


def _finite(x: float) -> float | None:
    """A score as written: the output is strict JSON, so a non-finite score (a broken model's) is null."""
    return x if math.isfinite(x) else None
