"""Train the built-in Qwen2-VL pair on the shapes task, from scratch, on CPU.

    python scripts/train_pair.py --out build/pair            # stages 1-3 and save, about 2 h on 2 cores
    python scripts/train_pair.py --out build/pair --stage lm --role small   # one stage

Stages (the recipe of ../shared/docs/toy-notes.md, scaled to 144-256 visual tokens):
1. `vision`: pre-train one vision tower on dense per-cell labels (shape, colour; one visual token is one cell)
   on small grids, with a throwaway head on the merger's hidden layer. Both models share it, frozen.
2. `pool`: run the frozen tower once over a pool of scenes and cache the merger's hidden features, so the
   language models train without re-running vision (two processes, one shard each).
3. `lm`: train each model's merger projection and language model on questions about the pool's scenes,
   loss on the answer tokens only, with a curriculum over grid size and random dropout of background
   visual tokens (so that answers survive pruning), at rope theta's own spectrum (`LM_SPEC`). Small and large
   train side by side, one core each.
4. `relation`: continue a stage-3 model with `TRAINED_SPEC`'s spectrum (M-RoPE's row and column sections
   turn by 1.6-0.2 rad per cell), a share of two-hop questions, and a throwaway probe that reads every visual
   token's left and upper neighbour from an early layer; `--more` continues it.
5. `save`: write both checkpoints (fp16 safetensors, processor, generation config) with `save_pretrained`:
   stage 4's models with `--weights relation` (the shipped pair), stage 3's with `--weights lm`.

`all` runs stages 1-3 and saves stage 3's models; the README lists every command behind the shipped pair.

Everything is seeded; one torch thread per process (two CPU-bound processes with two threads each run
several times slower on two cores).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sgl_cli.engine.builtin import shapes  # noqa: E402
from sgl_cli.engine.builtin.pair import TRAINED_SPEC, build_config, build_processor  # noqa: E402

PROMPT_SUFFIX = "Answer the question using a single word or phrase."  # the default preset's
WORDS = sorted(set(shapes.vocabulary()) | {"user", "assistant", "answer", "question", "using", "a", "single", "word",
                                           "or", "phrase", "."})
N_SHAPE, N_COLOR = len(shapes.SHAPES) + 1, len(shapes.COLORS) + 1  # "none" + each
# Stages 1-3 train at rope theta's own spectrum; stage 4 raises M-RoPE's row and column frequencies to the
# shipped spec's (at theta 1e4 and head_dim 32 they turn by at most 0.1 rad per row and 0.003 per column, too
# little for a head to single out a neighbouring cell).
LM_SPEC = replace(TRAINED_SPEC, spatial_freqs=())
BUCKETS = {"small": [(r, c) for r in range(3, 7) for c in range(3, 7)],
           "medium": [(r, c) for r in range(7, 12) for c in range(7, 12)],
           "large": list(shapes.EVAL_GRIDS)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def jpeg(img):
    # Items ship as quality-90 JPEGs; train on what inference sees.
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def make_model(role: str, processor, spec=LM_SPEC):
    from transformers import AutoModelForImageTextToText

    lm = spec.small if role == "small" else spec.large
    config = build_config(spec, lm, processor.tokenizer)
    return AutoModelForImageTextToText.from_config(config)


# -- stage 1: vision --------------------------------------------------------------------------------------------
def cell_labels(objs, rows, cols) -> torch.Tensor:
    shape = torch.zeros(rows * cols, dtype=torch.long)
    color = torch.zeros(rows * cols, dtype=torch.long)
    for o in objs:
        shape[o.row * cols + o.col] = shapes.SHAPES.index(o.shape) + 1
        color[o.row * cols + o.col] = list(shapes.COLORS).index(o.color) + 1
    return torch.stack([shape, color], 1)


def vision_batch(rng, processor, n, grids):
    images, labels = [], []
    for _ in range(n):
        rows, cols = rng.choice(grids)
        objs = shapes.random_objects(rng, rows, cols, rng.randint(1, max(1, rows * cols // 3)), set())
        images.append(jpeg(shapes.draw(objs, rows, cols, rng)))
        labels.append(cell_labels(objs, rows, cols))
    enc = processor.image_processor(images=images, return_tensors="pt")
    return enc["pixel_values"], enc["image_grid_thw"], torch.cat(labels)


def merger_hidden(visual, pixel_values, grid):
    """The vision tower's merged features before the per-model projection (the merger's GELU output)."""
    store = {}
    handle = visual.merger.mlp[1].register_forward_hook(lambda m, i, o: store.__setitem__("h", o))
    try:
        visual(pixel_values, grid_thw=grid)
    finally:
        handle.remove()
    return store["h"]


def stage_vision(out: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = build_processor(TRAINED_SPEC, WORDS)
    visual = make_model("small", processor).model.visual.train()
    width = visual.merger.mlp[0].out_features
    head = torch.nn.Linear(width, N_SHAPE + N_COLOR)
    params = [p for n, p in visual.named_parameters() if not n.startswith("merger.mlp.2")] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    grids = [(r, c) for r in range(3, 9) for c in range(3, 9)]
    t0 = time.time()
    for step in range(steps):
        lr = 1e-3 * min(1, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pv, grid, labels = vision_batch(rng, processor, 32, grids)
        logits = head(merger_hidden(visual, pv, grid))
        loss = torch.nn.functional.cross_entropy(logits[:, :N_SHAPE], labels[:, 0]) + \
            torch.nn.functional.cross_entropy(logits[:, N_SHAPE:], labels[:, 1])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            obj = labels[:, 0] > 0
            acc_s = (logits[obj, :N_SHAPE].argmax(-1) == labels[obj, 0]).float().mean().item()
            acc_c = (logits[obj, N_SHAPE:].argmax(-1) == labels[obj, 1]).float().mean().item()
            log(f"vision step {step} loss {loss.item():.3f} object-cell shape acc {acc_s:.3f} "
                f"colour acc {acc_c:.3f} ({time.time() - t0:.0f}s)")
    visual.eval()
    # Held-out check on evaluation-size grids: the labels are local, so small grids carry over.
    with torch.no_grad():
        pv, grid, labels = vision_batch(random.Random(seed + 999), processor, 16, list(shapes.EVAL_GRIDS))
        logits = head(merger_hidden(visual, pv, grid))
    acc = ((logits[:, :N_SHAPE].argmax(-1) == labels[:, 0]) & (logits[:, N_SHAPE:].argmax(-1) == labels[:, 1]))
    log(f"vision held-out (12-16 grids) per-cell accuracy {acc.float().mean().item():.4f}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in visual.state_dict().items()}, out / "vision.pt")
    (out / "vision.json").write_text(json.dumps({"steps": steps, "seed": seed, "minutes": (time.time() - t0) / 60,
                                                 "heldout_cell_acc": acc.float().mean().item()}))


# -- stage 2: feature pool --------------------------------------------------------------------------------------
def all_questions(ex: "shapes.Example") -> list[tuple[str, str, str]]:
    """Every valid (question, answer, type) about a scene, so one cached scene teaches several questions."""
    objs = ex.objs
    qs = [(ex.question, ex.answer, ex.type)]
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            qs.append((f"What color is the {o.shape}?", o.color, "color"))
        if sum(p.color == o.color for p in objs) == 1:
            qs.append((f"What shape is {o.color}?", o.shape, "shape"))
    for s in shapes.SHAPES:
        qs.append((f"How many {shapes.plural(s)} are there?", str(sum(o.shape == s for o in objs)), "count"))
    at = {(o.row, o.col): o for o in objs}
    for o in objs:
        name = shapes.object_name(o, objs)
        if name is None:
            continue
        near = [at[(o.row + i, o.col + j)] for i in (-1, 0, 1) for j in (-1, 0, 1)
                if (i or j) and (o.row + i, o.col + j) in at]
        for phrase, (dr, dc) in shapes.DIRECTIONS.items():
            if len(near) == 1 and (near[0].row - o.row, near[0].col - o.col) == (dr, dc):
                t = near[0]
                qs.append((f"What color is the shape {phrase} the {name}?", t.color, "relation"))
                qs.append((f"What shape is {phrase} the {name}?", t.shape, "relation"))
    return list(dict.fromkeys(qs))


def stage_pool(out: Path, shard: int, counts: dict[str, int], seed: int) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed * 1000 + shard)
    processor = build_processor(TRAINED_SPEC, WORDS)
    visual = make_model("small", processor).model.visual
    visual.load_state_dict(torch.load(out / "vision.pt"))
    visual.eval()
    scenes, feats = [], []
    t0 = time.time()
    with torch.no_grad():
        for bucket, n in counts.items():
            for start in range(0, n, 16):
                exs, images = [], []
                for _ in range(min(16, n - start)):
                    rows, cols = rng.choice(BUCKETS[bucket])
                    kind = "relation" if rng.random() < 0.5 else rng.choice(shapes.TYPES[:3])
                    ex = shapes.make_example(rng, rows, cols, kind)
                    exs.append(ex)
                    images.append(jpeg(shapes.draw(ex.objs, rows, cols, rng)))
                enc = processor.image_processor(images=images, return_tensors="pt")
                h = merger_hidden(visual, enc["pixel_values"], enc["image_grid_thw"]).half()
                sizes = [e.rows * e.cols for e in exs]
                for ex, f in zip(exs, h.split(sizes)):
                    scenes.append({"bucket": bucket, "rows": ex.rows, "cols": ex.cols,
                                   "objects": [(o.row, o.col) for o in ex.objs],
                                   "objs": [(o.shape, o.color, o.row, o.col) for o in ex.objs],
                                   "questions": all_questions(ex)})
                    feats.append(f.clone())
            log(f"pool shard {shard}: {bucket} done, {len(scenes)} scenes ({time.time() - t0:.0f}s)")
    torch.save({"scenes": scenes, "feats": feats}, out / f"pool{shard}.pt")


# -- stage 3: language models -----------------------------------------------------------------------------------
def by_type(questions, skip: str | None = None) -> dict[str, list]:
    """A scene's questions grouped by type (without `skip`)."""
    groups = {}
    for q in questions:
        if q[2] != skip:
            groups.setdefault(q[2], []).append(q)
    return groups


def held_out(pool: list[dict]) -> list[int]:
    """The evaluation-size scenes no stage trains on."""
    large = [i for i, s in enumerate(pool) if s["bucket"] == "large"]
    return large[-min(300, len(large) // 5):]


def train_projection_and_lm(model) -> None:
    """Freeze the shared tower; only each model's projection from it (and its language model) trains."""
    for name, param in model.model.visual.named_parameters():
        param.requires_grad = name.startswith("merger.mlp.2")


def optimizer(model, lr_max: float, extra=()):
    """AdamW over the trainable parameters (no weight decay on vectors or on `extra`, a throwaway head); returns
    it and every parameter it updates, for clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    extra = list(extra)
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr_max, betas=(0.9, 0.98)), params + extra


def warmup_cosine(lr_max: float, step: int, steps: int, warmup: int = 40) -> float:
    return lr_max * min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class Sampler:
    def __init__(self, pool: list[dict], feats: list[torch.Tensor], rng: random.Random):
        self.rng, self.feats = rng, feats
        self.by_bucket = {b: [i for i, s in enumerate(pool) if s["bucket"] == b] for b in BUCKETS}
        self.pool = pool

    def draw(self, frac: float):
        # Curriculum: small grids first (question-to-token retrieval appears on few tokens), then mostly
        # evaluation-size grids.
        weights = (1, 0, 0) if frac < 0.06 else (0.3, 0.5, 0.2) if frac < 0.25 else (0.1, 0.4, 0.5)
        bucket = self.rng.choices(list(BUCKETS), weights)[0]
        i = self.rng.choice(self.by_bucket[bucket])
        scene = self.pool[i]
        groups = by_type(scene["questions"])
        kind = self.rng.choice(sorted(groups))
        return i, self.rng.choice(groups[kind])


def encode_prompt(tokenizer, question: str, n_visual: int) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                  "text": f"{question}\n{PROMPT_SUFFIX}"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_visual)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def mrope_positions(ids: list[int], image_token: int, rows: int, cols: int) -> torch.Tensor:
    """(3, S) Qwen2-VL M-RoPE ids: text counts up; the image at start s is (s, s + row, s + col); text after
    the image resumes at s + max(rows, cols)."""
    pos, p, k = [], 0, 0
    for i, t in enumerate(ids):
        if t == image_token:
            if k == 0:
                start = p
            r, c = divmod(k, cols)
            pos.append((start, start + r, start + c))
            k += 1
            if k == rows * cols:
                p = start + max(rows, cols)
        else:
            pos.append((p, p, p))
            p += 1
    return torch.tensor(pos).T


def make_batch(samples, feats, pool, tokenizer, image_token, eos, drop: bool, rng: random.Random):
    seqs, keeps = [], []
    for i, (question, answer, _) in samples:
        scene = pool[i]
        rows, cols = scene["rows"], scene["cols"]
        prompt = encode_prompt(tokenizer, question, rows * cols)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt + target
        pos = mrope_positions(ids, image_token, rows, cols)
        visual = torch.tensor([t == image_token for t in ids])
        keep_v = torch.ones(rows * cols, dtype=torch.bool)
        if drop and rng.random() < 0.5:
            # Drop a random share of the background cells (never an object): pruning removes background.
            occupied = {r * cols + c for r, c in scene["objects"]}
            share = rng.random()
            for j in range(rows * cols):
                if j not in occupied and rng.random() < share:
                    keep_v[j] = False
        keeps.append(keep_v)
        keep = torch.ones(len(ids), dtype=torch.bool)
        keep[visual] = keep_v
        labels = torch.full((len(ids),), -100)
        labels[len(prompt) - 1:len(ids) - 1] = torch.tensor(target)  # position t predicts token t+1
        seqs.append((torch.tensor(ids)[keep], pos[:, keep], feats[i][keep_v].float(), visual[keep], labels[keep]))
    width = max(len(s[0]) for s in seqs)
    B = len(seqs)
    ids = torch.zeros(B, width, dtype=torch.long)
    pos = torch.zeros(3, B, width, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    vis = torch.zeros(B, width, dtype=torch.bool)
    labels = torch.full((B, width), -100)
    for b, (i_, p_, _, v_, l_) in enumerate(seqs):
        n = len(i_)
        ids[b, :n], pos[:, b, :n], mask[b, :n], vis[b, :n], labels[b, :n] = i_, p_, 1, v_, l_
    return ids, pos, mask, vis, torch.cat([s[2] for s in seqs]), labels, keeps


def forward(model, ids, pos, mask, vis, feats, probe_layer: int | None = None):
    """Logits; with `probe_layer`, also the visual tokens' hidden states after that many layers."""
    embeds = model.model.get_input_embeddings()(ids)
    proj = model.model.visual.merger.mlp[2](feats)
    embeds = embeds.masked_scatter(vis.unsqueeze(-1), proj.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                     output_hidden_states=probe_layer is not None)
    logits = model.lm_head(out.last_hidden_state)
    if probe_layer is None:
        return logits
    return logits, out.hidden_states[probe_layer][vis]


def load_pool(out: Path):
    pool, feats = [], []
    for f in sorted(out.glob("pool*.pt")):
        d = torch.load(f)
        pool += d["scenes"]
        feats += d["feats"]
    return pool, feats


def stage_lm(out: Path, role: str, steps: int, lr_max: float, seed: int, more: bool = False) -> None:
    """Train one model; with `more`, continue from its saved weights for `steps` more (a new warmup-cosine
    schedule, the training record extended)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = build_processor(TRAINED_SPEC, WORDS)
    tok = processor.tokenizer
    model = make_model(role, processor)
    vision = torch.load(out / "vision.pt")
    proj = {k: v for k, v in model.model.visual.state_dict().items() if k.startswith("merger.mlp.2")}
    model.model.visual.load_state_dict({**vision, **proj})  # the shared tower; a fresh projection per model
    before = None
    if more:
        model.load_state_dict(torch.load(out / f"{role}.pt"))
        before = json.loads((out / f"{role}.json").read_text())
    train_projection_and_lm(model)
    image_token = model.config.image_token_id
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pool, feats = load_pool(out)
    held = held_out(pool)
    held_set = set(held)
    train = [{**s, "bucket": "held"} if i in held_set else s for i, s in enumerate(pool)]
    sampler = Sampler(train, feats, rng)
    _check_positions(model, tok, pool, image_token)
    opt, params = optimizer(model, lr_max)
    t0 = time.time()
    model.train()
    for step in range(steps):
        frac = step / steps
        lr = warmup_cosine(lr_max, step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        samples = [sampler.draw(frac) for _ in range(32)]
        ids, pos, mask, vis, f, labels, _ = make_batch(samples, feats, pool, tok, image_token, eos, True, rng)
        logits = forward(model, ids, pos, mask, vis, f)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"{role} step {step} loss {loss.item():.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if (step + 1) % 500 == 0 or step == steps - 1:
            acc = evaluate(model, held, feats, pool, tok, image_token, eos)
            log(f"{role} step {step + 1} held-out answer accuracy {acc}")
    model.eval()
    torch.save(model.state_dict(), out / f"{role}.pt")
    acc = evaluate(model, held, feats, pool, tok, image_token, eos)
    record = {"steps": steps, "lr": lr_max, "seed": seed, "minutes": (time.time() - t0) / 60, "heldout": acc}
    if before is not None:
        record = {**record, "steps": before["steps"] + steps, "minutes": before["minutes"] + record["minutes"],
                  "phases": [*before.get("phases", [{k: before[k] for k in ("steps", "lr", "seed", "minutes")}]),
                             {"steps": steps, "lr": lr_max, "seed": seed, "minutes": record["minutes"]}]}
    (out / f"{role}.json").write_text(json.dumps(record))


def _check_positions(model, tok, pool, image_token) -> None:
    """The hand-built M-RoPE ids must equal the model's own `get_rope_index`."""
    s = next(s for s in pool if s["rows"] != s["cols"])
    ids = encode_prompt(tok, s["questions"][0][0], s["rows"] * s["cols"])
    t = torch.tensor([ids])
    ref, _ = model.model.get_rope_index(t, mm_token_type_ids=(t == image_token).int(),
                                        image_grid_thw=torch.tensor([[1, 2 * s["rows"], 2 * s["cols"]]]))
    assert torch.equal(ref[:, 0], mrope_positions(ids, image_token, s["rows"], s["cols"])), "M-RoPE mismatch"


@torch.no_grad()
def evaluate(model, held, feats, pool, tok, image_token, eos, only: str | None = None) -> dict:
    """Teacher-forced first-answer-token accuracy per question type on held-out scenes (one answer token);
    with `only`, one question of that type from every held-out scene that has one."""
    model.eval()
    rng = random.Random(0)
    right, total = {}, {}
    if only:
        held = [i for i in held if any(q[2] == only for q in pool[i]["questions"])]
    for start in range(0, len(held), 32):
        samples = []
        for i in held[start:start + 32]:
            groups = by_type(pool[i]["questions"])
            samples.append((i, rng.choice(groups[only or rng.choice(sorted(groups))])))
        ids, pos, mask, vis, f, labels, _ = make_batch(samples, feats, pool, tok, image_token, eos, False, rng)
        logits = forward(model, ids, pos, mask, vis, f)
        for b, (_, (_, _, kind)) in enumerate(samples):
            first = int((labels[b] != -100).nonzero()[0])
            ok = int(logits[b, first].argmax()) == int(labels[b, first])
            right[kind] = right.get(kind, 0) + ok
            total[kind] = total.get(kind, 0) + 1
    model.train()
    acc = {k: round(right[k] / total[k], 3) for k in sorted(total)}
    acc["all"] = round(sum(right.values()) / sum(total.values()), 3)
    return acc


# -- stage 4: spatial fine-tuning -------------------------------------------------------------------------------
# A visual token sees only earlier tokens (raster order), so it can read its left and upper neighbours: that
# covers all four directions, since "right of X" is the cell whose left neighbour is X.
NEIGHBOURS = ((0, -1), (-1, 0))


def neighbour_labels(scene: dict) -> torch.Tensor:
    """(rows*cols, 2 per neighbour): shape and colour (0: none) of each cell's left and upper neighbour."""
    rows, cols = scene["rows"], scene["cols"]
    at = {(r, c): (shape, color) for shape, color, r, c in scene["objs"]}
    lab = torch.zeros(rows * cols, 2 * len(NEIGHBOURS), dtype=torch.long)
    for r in range(rows):
        for c in range(cols):
            for j, (dr, dc) in enumerate(NEIGHBOURS):
                if (r + dr, c + dc) in at:
                    shape, color = at[(r + dr, c + dc)]
                    lab[r * cols + c, 2 * j] = shapes.SHAPES.index(shape) + 1
                    lab[r * cols + c, 2 * j + 1] = list(shapes.COLORS).index(color) + 1
    return lab


def neighbour_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a throwaway linear probe reading each visual token's neighbours from an early layer:
    dense supervision that grows the heads that attend one cell over, which the two-hop questions need."""
    logits = head(hidden)
    loss = 0
    for j in range(len(NEIGHBOURS)):
        o = j * (N_SHAPE + N_COLOR)
        loss = loss + torch.nn.functional.cross_entropy(logits[:, o:o + N_SHAPE], labels[:, 2 * j]) + \
            torch.nn.functional.cross_entropy(logits[:, o + N_SHAPE:o + N_SHAPE + N_COLOR], labels[:, 2 * j + 1])
    return loss / (2 * len(NEIGHBOURS))


class RelationSampler:
    """A `share` of two-hop questions (from scenes that have one), `count_share` of counting questions (or, if
    None, counting as often as colour and shape), the rest colour and shape, over all grid sizes: the small
    grids make the neighbour heads appear fast, the large ones are what evaluation sees."""

    def __init__(self, pool: list[dict], held: set, rng: random.Random, share: float,
                 count_share: float | None = None):
        self.rng, self.pool, self.share, self.count_share = rng, pool, share, count_share
        self.scenes = {b: [i for i, s in enumerate(pool) if s["bucket"] == b and i not in held] for b in BUCKETS}
        self.related = {b: [i for i in ids if any(q[2] == "relation" for q in pool[i]["questions"])]
                        for b, ids in self.scenes.items()}

    def draw(self, early: bool):
        # Early on mostly small and medium grids, where finding a cell's neighbour is easier to learn.
        bucket = self.rng.choices(list(BUCKETS), (0.3, 0.4, 0.3) if early else (0.1, 0.3, 0.6))[0]
        if self.rng.random() < self.share:
            i = self.rng.choice(self.related[bucket])
            return i, self.rng.choice(by_type(self.pool[i]["questions"])["relation"])
        i = self.rng.choice(self.scenes[bucket])
        groups = by_type(self.pool[i]["questions"], skip="relation")
        if self.count_share is not None:
            # Every scene has counting questions (a count of 0 included): draw them at their own share.
            counting = self.rng.random() < self.count_share / (1 - self.share)
            others = {k: v for k, v in groups.items() if k != "count"}
            groups = others if others and not counting else {"count": groups["count"]}
        return i, self.rng.choice(groups[self.rng.choice(sorted(groups))])


def stage_relation(out: Path, role: str, steps: int, lr_max: float, seed: int, share: float, probe_weight: float,
                   probe_layer: int, warmup_frac: float, more: bool = False, count_share: float | None = None,
                   stop_after: int | None = None) -> None:
    """Continue stage 3's model with `TRAINED_SPEC`'s rotary spectrum, two-hop questions at `share`, and the
    neighbour probe; like fine-tuning a language model after changing its RoPE scaling. Writes `{role}.rel.pt`
    at every evaluation, so it can be stopped. With `more`, continue `{role}.rel.pt` for `steps` more (a new
    warmup-cosine schedule and a fresh probe head; the previous checkpoint is kept as `{role}.rel.<steps>.pt`).
    `stop_after` ends the run after that many of the `steps` (the schedule still spans `steps`)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = build_processor(TRAINED_SPEC, WORDS)
    tok = processor.tokenizer
    model = make_model(role, processor, TRAINED_SPEC)
    source = f"{role}.rel" if more else role
    model.load_state_dict(torch.load(out / f"{source}.pt"))
    before = json.loads((out / f"{source}.json").read_text())
    done = before["steps"] if more else 0
    if more:
        shutil.copyfile(out / f"{role}.rel.pt", out / f"{role}.rel.{done}.pt")
        shutil.copyfile(out / f"{role}.rel.json", out / f"{role}.rel.{done}.json")
    train_projection_and_lm(model)
    image_token = model.config.image_token_id
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pool, feats = load_pool(out)
    assert all("objs" in s for s in pool), "pool made before objects were stored: re-run --stage pool"
    held = held_out(pool)
    sampler = RelationSampler(pool, set(held), rng, share, count_share)
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(NEIGHBOURS) * (N_SHAPE + N_COLOR))
    opt, params = optimizer(model, lr_max, head.parameters())
    t0 = time.time()

    def checkpoint(step):
        acc = evaluate(model, held, feats, pool, tok, image_token, eos)
        rel = evaluate(model, held, feats, pool, tok, image_token, eos, only="relation")["relation"]
        log(f"{role} step {step} held-out answer accuracy {acc}, two-hop only {rel}")
        torch.save(model.state_dict(), out / f"{role}.rel.pt")
        record = {"steps": done + step, "of": done + steps, "lr": lr_max, "seed": seed, "relation_share": share,
                  "count_share": count_share, "probe_weight": probe_weight, "probe_layer": probe_layer,
                  "small_grids_until": warmup_frac,
                  "minutes": (time.time() - t0) / 60,
                  "heldout": acc, "heldout_relation": rel, "previous" if more else "stage3": before}
        (out / f"{role}.rel.json").write_text(json.dumps(record))

    checkpoint(0)
    model.train()
    last = min(steps, stop_after or steps)
    for step in range(last):
        lr = warmup_cosine(lr_max, step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        samples = [sampler.draw(step < warmup_frac * steps) for _ in range(32)]
        ids, pos, mask, vis, f, labels, keeps = make_batch(samples, feats, pool, tok, image_token, eos, True, rng)
        logits, hidden = forward(model, ids, pos, mask, vis, f, probe_layer)
        answer = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        probe_labels = torch.cat([neighbour_labels(pool[i])[k] for (i, _), k in zip(samples, keeps)])
        probe = neighbour_loss(head, hidden, probe_labels)
        loss = answer + probe_weight * probe
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"{role} step {step} answer loss {answer.item():.4f} probe loss {probe.item():.4f} lr {lr:.2e} "
                f"({time.time() - t0:.0f}s)")
        if (step + 1) % 250 == 0 or step == last - 1:
            checkpoint(step + 1)
            model.train()


# -- stage 5: save ----------------------------------------------------------------------------------------------
def stage_save(out: Path, dest: Path, weights: str = "relation") -> None:
    """Save stage 3's models (`weights="lm"`) or stage 4's (`"relation"`, with their rotary spectrum)."""
    from dataclasses import asdict

    from transformers import GenerationConfig

    spec, suffix = (LM_SPEC, "") if weights == "lm" else (TRAINED_SPEC, ".rel")
    processor = build_processor(spec, WORDS)
    record = {"vision": json.loads((out / "vision.json").read_text())}
    for role in ("small", "large"):
        model = make_model(role, processor, spec)
        model.load_state_dict(torch.load(out / f"{role}{suffix}.pt"))
        model = model.to(torch.float16).eval()
        model.generation_config = GenerationConfig(
            eos_token_id=model.config.text_config.eos_token_id,
            pad_token_id=model.config.text_config.pad_token_id, do_sample=False)
        folder = dest / role
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
        record[role] = json.loads((out / f"{role}{suffix}.json").read_text())
        (folder / "SGL_BUILTIN.json").write_text(json.dumps(
            {"role": role, "random_weights": False, "task": "shapes", "spec": asdict(spec),
             "training": record}, indent=1))
    log(f"saved the pair to {dest}: {json.dumps(record)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "pair", help="working folder")
    ap.add_argument("--dest", type=Path, default=ROOT / "sgl_cli" / "weights" / "default")
    ap.add_argument("--stage", choices=("all", "vision", "pool", "lm", "relation", "save"), default="all")
    ap.add_argument("--role", choices=("small", "large"))
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--pool", type=int, default=4000, help="scenes per shard (two shards)")
    ap.add_argument("--small-steps", type=int, default=3000)
    ap.add_argument("--large-steps", type=int, default=1400)
    ap.add_argument("--weights", choices=("lm", "relation"), default="relation",
                    help="with --stage save: stage 4's models (`relation`, shipped) or stage 3's (`lm`)")
    ap.add_argument("--small-rel-steps", type=int, default=1500, help="stage 4 steps of the small model")
    ap.add_argument("--large-rel-steps", type=int, default=1800, help="stage 4 steps of the large model")
    ap.add_argument("--relation-share", type=float, default=0.6, help="stage 4: share of two-hop questions")
    ap.add_argument("--count-share", type=float,
                    help="stage 4: share of counting questions (default: as often as colour and shape)")
    ap.add_argument("--probe-weight", type=float, default=0.5, help="stage 4: weight of the neighbour probe")
    ap.add_argument("--probe-layer", type=int, default=1, help="stage 4: the probe reads the output of this layer")
    ap.add_argument("--small-grids-until", type=float, default=0.3,
                    help="stage 4: share of the steps that draw mostly small and medium grids")
    ap.add_argument("--more", type=int, default=0,
                    help="with --stage lm or relation: continue --role's saved model for this many steps")
    ap.add_argument("--lr", type=float, help="with --more: peak learning rate of the continuation (default 3e-4)")
    ap.add_argument("--stop-after", type=int,
                    help="with --stage relation: stop after this many steps (the learning-rate schedule still "
                         "spans all of them), as a run stopped by hand")
    a = ap.parse_args()
    if a.stop_after is not None and a.stop_after < 1:
        ap.error("--stop-after must be at least 1")
    if a.count_share is not None and not 0 <= a.count_share <= 1 - a.relation_share:
        ap.error(f"--count-share must be between 0 and 1 - --relation-share ({1 - a.relation_share:g})")
    torch.set_num_threads(1)
    if a.stage == "vision":
        stage_vision(a.out, a.vision_steps, a.seed)
    elif a.stage == "pool":
        n = a.pool
        stage_pool(a.out, a.shard, {"small": n // 10, "medium": n // 5, "large": n - n // 10 - n // 5}, a.seed)
    elif a.stage == "lm" and a.more:
        stage_lm(a.out, a.role, a.more, a.lr or 3e-4, a.seed + 2, more=True)
    elif a.stage == "lm":
        if a.role == "small":
            stage_lm(a.out, "small", a.small_steps, 7e-4, a.seed)
        else:
            stage_lm(a.out, "large", a.large_steps, 5e-4, a.seed + 1)
    elif a.stage == "relation":
        steps, lr = (a.small_rel_steps, 7e-4) if a.role == "small" else (a.large_rel_steps, 5e-4)
        if a.more:
            steps, lr = a.more, a.lr or 3e-4
        stage_relation(a.out, a.role, steps, lr, a.seed + 3 + (a.more > 0), a.relation_share, a.probe_weight,
                       a.probe_layer, a.small_grids_until, more=a.more > 0, count_share=a.count_share,
                       stop_after=a.stop_after)
    elif a.stage == "save":
        stage_save(a.out, a.dest, a.weights)
    else:
        me = [sys.executable, __file__, "--out", str(a.out), "--seed", str(a.seed)]
        t0 = time.time()
        subprocess.run([*me, "--stage", "vision", "--vision-steps", str(a.vision_steps)], check=True)
        both = [subprocess.Popen([*me, "--stage", "pool", "--shard", str(s), "--pool", str(a.pool)]) for s in (0, 1)]
        assert all(p.wait() == 0 for p in both)
        both = [subprocess.Popen([*me, "--stage", "lm", "--role", r, "--small-steps", str(a.small_steps),
                                  "--large-steps", str(a.large_steps)]) for r in ("small", "large")]
        assert all(p.wait() == 0 for p in both)
        subprocess.run([*me, "--stage", "save", "--weights", "lm", "--dest", str(a.dest)], check=True)
        log(f"all stages: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
