"""A synthetic video task for the built-in pair: find the frame that shows the scene (issue 36's accuracy check).

    python scripts/video_task.py OUT [--items 200] [--seed 0]
    sgl eval OUT/video.jsonl -p OUT/preset.yaml --guide sgl,random --retain 1,0.25,0.1,0.05

Each item is a 4-second clip at 2 frames per second (8 frames, 4 of Qwen's two-frame temporal patches). One
temporal patch shows a shapes scene (the built-in task's, 12 x 12 cells: 144 visual tokens); the other three show
the same kind of noisy background with no shapes. The question is about the scene, so the answer is in one quarter
of the 576 video tokens: a guide that keeps 25% can keep exactly that patch; random keeps a quarter of it.

The built-in pair was trained on still images (each a temporal patch of two equal frames at temporal position 0),
so each picture is shown for two frames here too; it never saw a temporal position above 0, nor 576 tokens. OUT
also gets `image.jsonl`, the same questions asked of the scene as a picture: the pair's accuracy without the video.

The pair (the shipped `default` weights) is copied to OUT/pair with a video processor and a chat template that has
a video part; that needs torchvision (the environment scripts/vllm_env.sh builds has it).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

FRAMES_PER_PICTURE = 2  # Qwen's temporal patch: a picture shown for two frames is one patch of its own
PICTURES = 4  # temporal patches per clip
GRID = 12  # cells a side: 12 x 12 = 144 visual tokens per picture
VIDEO_PART = "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"


def pair_with_video(out: Path) -> dict[str, Path]:
    """The shipped default pair, copied, with a video processor and a chat template that places a video."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from sgl_cli.engine.builtin.pair import SHIPPED
    from sgl_cli.engine.core.processors import load_processor

    paths = {}
    for role in ("small", "large"):
        folder = out / "pair" / role
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(SHIPPED["default"] / role, folder)
        p = load_processor(folder)
        ip = p.image_processor
        size = dict(ip.size) if isinstance(ip.size, dict) else ip.size.__dict__
        vp = Qwen2VLVideoProcessor(size={"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]},
                                   patch_size=ip.patch_size, merge_size=ip.merge_size, temporal_patch_size=2)
        template = p.chat_template.replace("{% elif part['type'] == 'text' %}",
                                           VIDEO_PART + "{% elif part['type'] == 'text' %}")
        Qwen2VLProcessor(image_processor=ip, tokenizer=p.tokenizer, video_processor=vp,
                         chat_template=template).save_pretrained(folder)
        paths[role] = folder
    return paths


def write_items(out: Path, n: int, seed: int) -> None:
    from sgl_cli.engine.builtin.shapes import TYPES, draw, make_example

    rng = random.Random(seed)
    frames_dir = out / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    videos, images = [], []
    for i in range(n):
        ex = make_example(rng, GRID, GRID, TYPES[i % len(TYPES)])
        where = rng.randrange(PICTURES)
        names = []
        for k in range(PICTURES):
            picture = draw(ex.objs if k == where else [], GRID, GRID, rng)
            name = f"frames/{i:04d}_{k}.png"
            picture.save(out / name)
            names += [name] * FRAMES_PER_PICTURE
        common = {"question": ex.question, "answer": ex.answer, "type": ex.type}
        videos.append({"id": f"video-{i}", "video": names, "fps": 2, **common, "where": where})
        images.append({"id": f"image-{i}", "image": f"frames/{i:04d}_{where}.png", **common})
    (out / "video.jsonl").write_text("".join(json.dumps(x) + "\n" for x in videos))
    (out / "image.jsonl").write_text("".join(json.dumps(x) + "\n" for x in images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pair = pair_with_video(args.out)
    write_items(args.out, args.items, args.seed)
    (args.out / "preset.yaml").write_text(
        "name: video-shapes\n"
        f"small: {{model: {pair['small']}, dtype: float32}}\n"
        f"large: {{model: {pair['large']}, dtype: float32}}\n"
        "threshold: null\n")
    print(f"wrote {args.items} video items to {args.out / 'video.jsonl'} and the pair to {args.out / 'pair'}")


if __name__ == "__main__":
    main()
