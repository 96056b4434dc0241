"""Video items on the transformers large backend (issue 36), in the environment that has torchvision (transformers'
video processors need it): tiny Qwen2-VL and Qwen2.5-VL pairs given a video processor and a chat template with a
video part, and short synthetic videos written by PyAV in the test.

What is checked against an independent computation: retain 1.0 answers as plain `generate` on the processor's own
video inputs; SGP's importance over the video tokens equals an eager reference; the (t, h, w) position ids of the
video tokens (Qwen2.5-VL's time-aligned temporal ids included) equal ids computed here from the grid; an image and
a video share one budget; a batch gives batch 1's records with videos of different lengths.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ARCHS = ("qwen2_vl", "qwen2_5_vl")
VIDEO_PART = "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
SUFFIX = "Answer with one word."


def _with_video(folder: Path, arch: str) -> None:
    """Give a built-in checkpoint folder a video processor (frames up to 112 x 112 px) and a template with video."""
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from sgl_cli.engine.builtin.pair import CHAT_TEMPLATE
    from sgl_cli.engine.core.processors import load_processor

    p = load_processor(folder)
    vp = Qwen2VLVideoProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14,
                               merge_size=2, temporal_patch_size=2)
    template = CHAT_TEMPLATE.replace("{% elif part['type'] == 'text' %}", VIDEO_PART + "{% elif part['type'] == "
                                     "'text' %}")
    cls = Qwen2_5_VLProcessor if arch == "qwen2_5_vl" else Qwen2VLProcessor
    cls(image_processor=p.image_processor, tokenizer=p.tokenizer, video_processor=vp,
        chat_template=template).save_pretrained(folder)


def write_video(path: Path, frames: int, fps: int = 4, seed: int = 0) -> Path:
    """A 112 x 84 clip of random 14-pixel blocks, a new picture every frame."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
        for _ in range(frames):
            a = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((14, 14, 1))).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair

    root = tmp_path_factory.mktemp("video")
    out = {}
    for arch in ARCHS:
        pair = build_pair(dataclasses.replace(TINY_SPEC, arch=arch), root / arch)
        for role in ("small", "large"):
            _with_video(pair[role], arch)
        out[arch] = pair
    return out


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """An input folder: three clips (4, 3 and 2 s at 4 fps), a picture, and items using them."""
    from PIL import Image

    d = tmp_path_factory.mktemp("clips")
    write_video(d / "a.mp4", 16, seed=1)
    write_video(d / "b.mp4", 12, seed=2)
    write_video(d / "c.mp4", 8, seed=3)
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (84, 112, 3)).astype(np.uint8)).save(d / "p.png")
    items = [{"video": "a.mp4", "question": "what moves?"},
             {"video": "b.mp4", "question": "what colour?", "fps": 1},
             {"image": "p.png", "question": "and here?"},
             {"image": "p.png", "video": "c.mp4", "question": "same?"}]
    (d / "in.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return d


def _models(pair):
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    return (load_model(ModelSpec(str(pair["small"]), dtype="float32"), "small"),
            load_model(ModelSpec(str(pair["large"]), dtype="float32"), "large"))


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, video_pairs):
    return request.param, _models(video_pairs[request.param])


def _engine(loaded, **settings):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import Settings

    base = dict(threshold=None, max_new_tokens=5, prompt_suffix=SUFFIX)
    base.update(settings)
    return Engine(Settings(**base), *loaded[1])


def _reference_inputs(processor, folder: Path, item: dict):
    """The processor's inputs for `item`, built here: frames decoded by PyAV at the item's rate (2 per second by
    default, the middle of each interval), handed over with their timing."""
    import av
    from transformers.video_utils import VideoMetadata

    fps = item.get("fps", 2)
    with av.open(str(folder / item["video"])) as c:
        decoded = [(f.time, f.to_image()) for f in c.decode(video=0)]
    duration = len(decoded) / 4
    n = round(duration * fps)
    times = [(i + 0.5) * duration / n for i in range(n)]
    frames = [[im for t, im in decoded if t <= want][-1] for want in times]
    text = {"type": "text", "text": f"{item['question']}\n{SUFFIX}"}
    parts = ([{"type": "image"}] if "image" in item else []) + [{"type": "video"}, text]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                         tokenize=False)
    images = {"images": [_picture(folder / item["image"])]} if "image" in item else {}
    meta = VideoMetadata(total_num_frames=n, fps=n / duration, duration=duration, frames_indices=list(range(n)))
    return processor(text=[text], videos=[frames], video_metadata=[meta], do_sample_frames=False,
                     return_tensors="pt", **images)


def _picture(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _items(clips):
    return [json.loads(line) for line in (clips / "in.jsonl").read_text().splitlines()]


def _retain_one_is_plain_generate(loaded, clips) -> list[tuple[dict, int]]:
    """Run the clips at retain 1.0: every record answered; each video item's answer is plain `generate`'s on the
    processor's own inputs and its `visual_tokens` their image and video placeholders. (record, that count) per
    video item."""
    from sgl_cli.engine import read_items

    eng = _engine(loaded, retain=1.0)
    records = list(eng.run(read_items(clips / "in.jsonl")))
    large = eng.large
    out = []
    for item, rec in zip(_items(clips), records):
        assert rec["error"] is None, rec["error"]
        if "video" not in item:
            continue
        enc = _reference_inputs(large.processor, clips, item)
        with torch.no_grad():
            generated = large.model.generate(**enc, max_new_tokens=5, do_sample=False)
        expected = large.processor.tokenizer.decode(generated[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert rec["answer"] == expected.strip(), item
        ids = enc["input_ids"][0]
        n = int((ids == large.model.config.video_token_id).sum() + (ids == large.model.config.image_token_id).sum())
        assert rec["visual_tokens"] == n
        out.append((rec, n))
    return out


def test_retain_one_answers_as_plain_generate_with_the_video(loaded, clips):

    for rec, n in _retain_one_is_plain_generate(loaded, clips):
        assert rec["retained_tokens"] == n
        assert rec["exit"] == "large"


@pytest.mark.parametrize("which", [0, 1])
def test_video_positions_are_the_models_t_h_w_ids(loaded, clips, which):
    """The position ids sgl keeps per visual token equal (t, h, w) ids computed here from the grid: the temporal id
    steps by `tokens_per_second x seconds per temporal patch` on Qwen2.5-VL (time-aligned: 1 s per patch at 2
    frames per second, 2 s at the second item's 1 per second), by 1 on Qwen2-VL."""
    arch, (small, large) = loaded
    eng = _engine(loaded, retain=1.0)
    from sgl_cli.engine import read_items

    item = list(read_items(clips / "in.jsonl"))[which]
    (w,) = eng.prepare([item])
    enc = w.encoded.large
    (row,) = large.family.rows(large.model, [enc])
    video = enc["input_ids"][0] == large.model.config.video_token_id
    start = int(video.nonzero()[0, 0])
    t, h, wd = (int(v) for v in enc["video_grid_thw"][0])
    h, wd = h // 2, wd // 2
    if arch == "qwen2_5_vl":
        step = large.model.config.vision_config.tokens_per_second * float(enc["second_per_grid_ts"][0])
    else:
        step = 1.0
    expect = torch.tensor([[int(k * step), r, c] for k in range(t) for r in range(h) for c in range(wd)]).t() + start
    assert torch.equal(row.pos[:, video], expect)
    # a.mp4: 4 s at 2 per second, 8 frames, 4 temporal patches; b.mp4: 3 s at 1 per second, 3 frames (padded to 4)
    assert (t, w.encoded.video.fps) == ((4, 2.0) if which == 0 else (2, 1.0))
    if arch == "qwen2_5_vl":
        assert step == (4.0 if which == 0 else 8.0)
    # Text after the video resumes past the largest id the video used.
    assert int(row.pos[0, -1]) > int(expect.max())


def test_sgp_importance_over_video_equals_an_eager_reference(video_pairs, clips):
    """SGP over video tokens: the attention each one receives from the prompt after the video and every generated
    token, summed over layers and heads, from eager attentions of a plain `generate`."""
    from transformers import AutoModelForImageTextToText

    from sgl_cli.engine import read_items

    pair = video_pairs["qwen2_5_vl"]
    loaded = ("qwen2_5_vl", _models(pair))
    eng = _engine(loaded, retain=0.25)
    item = next(read_items(clips / "in.jsonl"))
    (w,) = eng.prepare([item])
    eng.small_pass([w])
    eager = AutoModelForImageTextToText.from_pretrained(pair["small"], attn_implementation="eager").eval()
    enc = _reference_inputs(eng.small.processor, clips, _items(clips)[0])
    with torch.no_grad():
        out = eager.generate(**enc, max_new_tokens=5, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    ids = enc["input_ids"][0]
    visual = ids == eager.config.video_token_id
    last, s = int(visual.nonzero().max()), len(ids)
    total = torch.zeros(s, dtype=torch.float64)
    for step, layers in enumerate(out.attentions):
        for attn in layers:
            rows = attn[0, :, last + 1:, :s] if step == 0 else attn[0, :, -1:, :s]
            total += rows.double().sum(dim=(0, 1))
    assert w.small.tokens == out.sequences[0, s:].tolist()
    torch.testing.assert_close(w.small.importance.double(), total[visual], rtol=1e-4, atol=1e-6)


def test_an_image_and_a_video_share_one_budget(loaded, clips):
    from sgl_cli.engine import read_items
    from sgl_cli.engine.guides.base import n_keep

    eng = _engine(loaded, retain=0.25)
    rec = list(eng.run(read_items(clips / "in.jsonl")))[3]
    assert rec["error"] is None
    # c.mp4: 2 s at 2 per second, 4 frames, 2 temporal patches of 3 x 4 tokens; the picture: 3 x 4 tokens.
    assert rec["visual_tokens"] == 2 * 12 + 12
    assert rec["retained_tokens"] == n_keep(36, 0.25)


def test_a_batch_gives_batch_ones_records_with_videos_of_different_lengths(loaded, clips):
    from sgl_cli.engine import read_items

    def run(batch):
        recs = list(_engine(loaded, retain=0.3, batch_size=batch).run(read_items(clips / "in.jsonl")))
        return [{k: v for k, v in r.items() if k != "ms"} for r in recs]

    one, four = run(1), run(4)
    assert [r["visual_tokens"] for r in one] == [48, 24, 12, 36]
    for a, b in zip(one, four):
        for key in ("answer", "exit", "small_answer", "visual_tokens", "retained_tokens", "error"):
            assert a[key] == b[key], key
        for key in ("exit_score", "confidence", "consistency"):  # float rounding differs between batch shapes
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


def test_a_damaged_video_is_its_items_error_and_the_run_goes_on(loaded, clips, tmp_path):
    from sgl_cli.engine import read_items

    (tmp_path / "bad.mp4").write_bytes((clips / "a.mp4").read_bytes()[:300])
    (tmp_path / "a.mp4").write_bytes((clips / "a.mp4").read_bytes())
    (tmp_path / "in.jsonl").write_text(json.dumps({"video": "bad.mp4", "question": "q"}) + "\n"
                                       + json.dumps({"video": "a.mp4", "question": "q"}) + "\n")
    recs = list(_engine(loaded, retain=0.3).run(read_items(tmp_path / "in.jsonl")))
    assert recs[0]["error"].startswith("line 1: video 'bad.mp4' ")
    assert recs[1]["error"] is None and recs[1]["visual_tokens"] == 48


def test_saved_scores_and_the_report_show_each_temporal_patch(video_pairs, clips, tmp_path):
    """`--save-scores` saves a grid per temporal patch (two frames), after the item's images; the report's card
    shows the picture and one thumbnail per patch, each shaded by the kept tokens that fall in it."""
    import base64

    from sgl_cli.engine.io.scores import read_scores
    from sgl_cli.engine.preset import load_preset
    from sgl_cli.engine.runs.run import Run
    from sgl_cli.engine.views.report_data import gather
    from tests.conftest import write_preset

    preset = load_preset(str(write_preset(tmp_path, video_pairs["qwen2_5_vl"], retain=0.25,
                                          prompt_suffix=SUFFIX)))
    out = tmp_path / "run.jsonl"
    Run(clips / "in.jsonl", preset, out=out, save_scores=True).execute()
    saved = read_scores(tmp_path / "run.scores.arrow")
    row = saved[4]  # the picture, then c.mp4's two temporal patches
    assert [(g["name"], g["image"], g["rows"], g["cols"]) for g in row["grids"]] == [
        ("image", 0, 3, 4), ("frames 1-2", 1, 3, 4), ("frames 3-4", 2, 3, 4)]
    tokens = [np.asarray(g["tokens"]).ravel().tolist() for g in row["grids"]]
    assert sorted(sum(tokens, [])) == list(range(36))  # every visual token in exactly one grid
    card = gather(out).cards[3]
    assert len(card.images) == 3 and all(card.images)
    kept = set(np.asarray(row["kept"]).tolist())
    for grid, overlay in zip(tokens, card.overlays):
        bits = np.unpackbits(np.frombuffer(base64.b64decode(overlay["mask"]), dtype=np.uint8))[:12]
        assert bits.tolist() == [int(t in kept) for t in grid]
    assert len(gather(out).cards[0].images) == 4  # a.mp4: 8 frames, 4 patches


@pytest.fixture(scope="module", params=ARCHS)
def vllm_video(request, video_pairs, tmp_path_factory):
    """(arch, an Engine whose large model runs on vLLM, the transformers large model of the same checkpoint)."""
    import gc

    from conftest import ENGINE

    from sgl_cli.engine import Engine
    from sgl_cli.engine.preset import load_preset
    from tests.conftest import write_preset

    folder = tmp_path_factory.mktemp(f"vllm-{request.param}")
    pair = {}
    for role, source in video_pairs[request.param].items():
        # transformers numbers the text after a video from max(h, w) (its get_rope_index since 5.0), vLLM from the
        # video's largest position + 1 (Qwen's original rule): they agree when the video's temporal ids stay below
        # max(h, w). One token per second of footage keeps them there for these clips (4 temporal patches, 4 wide).
        pair[role] = folder / role
        shutil.copytree(source, pair[role])
        config = json.loads((pair[role] / "config.json").read_text())
        config["vision_config"]["tokens_per_second"] = 1
        (pair[role] / "config.json").write_text(json.dumps(config))
    preset = write_preset(folder, pair, prompt_suffix=SUFFIX, large={
        "model": str(pair["large"]), "dtype": "float32", "backend": "vllm", "options": dict(ENGINE)})
    engine = Engine.load(load_preset(str(preset)))
    yield request.param, engine, _models(pair)[1]
    engine.large.close()
    gc.collect()


@pytest.mark.parametrize("retain", [1.0, 0.3])
def test_vllm_answers_video_items_as_transformers_from_the_same_kept_tokens(vllm_video, clips, retain):
    """Video items (alone, at 1 frame per second, and beside a picture) and a picture alone through both large
    backends: the same kept set (over the images' and the video's tokens in sequence order), the same answer
    tokens. At 0.3 the kept set has tokens of both media where the item has both."""
    from sgl_cli.engine import read_items
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order
    from sgl_cli.engine.pipeline.engine import Engine

    arch, v, hf_large = vllm_video
    v = v.with_settings(retain=retain)
    got = {}
    for name, engine in (("vllm", v), ("transformers", Engine(v.settings, v.small, hf_large))):
        works = engine.prepare(list(read_items(clips / "in.jsonl")))
        engine.small_pass(works)
        assert all(w.ok for w in works), [w.error for w in works]
        got[name] = (works, engine.large_pass(works, engine.large_inputs(works)))
    (works, va), (_, ta) = got["vllm"], got["transformers"]
    for i, (w, a, b) in enumerate(zip(works, va, ta)):
        n = int(w.encoded.visual.sum())
        want = top_k_in_order(w.small.importance, n_keep(n, retain))
        assert torch.equal(a.kept, want) and torch.equal(b.kept, want), i
        if i == 3 and retain < 1.0:  # the picture's 12 tokens come first, then c.mp4's 24
            assert 0 < int((a.kept < 12).sum()) < len(a.kept), i
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.tokens == b.tokens and a.answer == b.answer, (arch, i, a.answer, b.answer)


@pytest.mark.parametrize("retain", [1.0, 0.3])
def test_the_plugins_video_positions_are_stock_vllms(video_pairs, clips, retain):
    """The positions sgl's vLLM plugin gives a request with a video (Qwen2.5-VL, 4 tokens per second: temporal ids
    0, 8 at 1 frame per second, 0, 4, 8, 12 at 2) are stock vLLM's for the whole prompt at the kept columns, and
    the text after the video continues from the full video's largest position + 1, kept or not."""
    from types import SimpleNamespace

    from vllm.config import ModelConfig
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Stock
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from sgl_cli.engine import read_items
    from sgl_cli.engine.backends.vllm import plugin
    from sgl_cli.engine.backends.vllm.large import _video_input
    from sgl_cli.engine.backends.vllm.models import mrope_positions
    from sgl_cli.engine.core.processors import load_processor

    plugin.register()
    folder = video_pairs["qwen2_5_vl"]["large"]
    config = ModelConfig(model=str(folder), hf_overrides={"architectures": ["SglQwen2_5_VLForConditionalGeneration"]},
                         dtype="float32", limit_mm_per_prompt={"image": 64, "video": 1}, mm_processor_cache_gb=0)
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    template = load_processor(folder)
    eng = _engine(("qwen2_5_vl", _models(video_pairs["qwen2_5_vl"])), retain=1.0)
    for item in list(read_items(clips / "in.jsonl"))[:2]:
        (w,) = eng.prepare([item])
        prompt = template.apply_chat_template(w.encoded.prompt, add_generation_prompt=True, tokenize=False)
        n = int(w.encoded.visual.sum())
        kept = list(range(n)) if retain == 1.0 else sorted(range(0, n, 3))

        def render(kept_video):
            out = processor(prompt, processor.info.parse_mm_data({"video": [_video_input(w.encoded.video)]}),
                            hf_processor_mm_kwargs={"sgl_kept_video": kept_video})
            features = [SimpleNamespace(modality="video", data=d, mm_position=p)
                        for d, p in zip(out["mm_kwargs"]["video"], out["mm_placeholders"]["video"])]
            return out, features

        full, full_features = render(list(range(n)))
        stock_model = SimpleNamespace(config=config.hf_config)
        stock_model.iter_mm_grid_thw = lambda f: Stock.iter_mm_grid_thw(stock_model, f)
        stock, _ = Stock.get_mrope_input_positions(stock_model, full["prompt_token_ids"], full_features)
        out, features = render(kept)
        ids = out["prompt_token_ids"]
        got, delta = mrope_positions(config.hf_config, len(ids), features)
        video = torch.tensor(full["prompt_token_ids"]) == eng.large.model.config.video_token_id
        columns = (~video).clone()
        columns[video.nonzero()[kept, 0]] = True
        assert torch.equal(got, stock[:, columns])
        assert delta == int(got.max()) + 1 - len(ids)
        step = 8 if item.video.fps == 1 else 4
        first = int(video.nonzero()[0, 0])
        assert sorted(set(stock[0, video].tolist())) == [first + step * k for k in range(int(
            w.encoded.large["video_grid_thw"][0, 0]))]


def test_answers_continue_after_the_videos_last_time_id(video_pairs, clips, tmp_path):
    """At 25 tokens per second (Qwen2.5-VL's time ids 0, 25, 50, 75 for a.mp4) the video's ids pass the text
    after it: transformers' own generate puts the first answer token after the largest position, not after the last
    column's, and so does sgl, at retain 1.0 (8 answer tokens equal) and pruned (the same next position)."""
    from sgl_cli.engine import read_items

    pair = {}
    for role, source in video_pairs["qwen2_5_vl"].items():
        pair[role] = tmp_path / role
        shutil.copytree(source, pair[role])
        config = json.loads((pair[role] / "config.json").read_text())
        config["vision_config"]["tokens_per_second"] = 25
        (pair[role] / "config.json").write_text(json.dumps(config))
    loaded = ("qwen2_5_vl", _models(pair))
    item = _items(clips)[0]
    eng = _engine(loaded, retain=1.0, max_new_tokens=8)
    rec = list(eng.run(read_items(clips / "in.jsonl")))[0]
    large = eng.large
    enc = _reference_inputs(large.processor, clips, item)
    with torch.no_grad():
        out = large.model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert rec["answer"] == large.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                              skip_special_tokens=True).strip()
    (w,) = eng.prepare(list(read_items(clips / "in.jsonl"))[:1])
    (row,) = large.family.rows(large.model, [w.encoded.large])
    assert row.next_pos == int(row.pos.max()) + 1 > int(row.pos[0, -1]) + 1  # the video's last time id is the max
    pruned = row.keep(w.encoded.visual, torch.tensor([0, 1, 2]))  # the first temporal patch's tokens only
    assert pruned.next_pos == row.next_pos and torch.equal(pruned.next_position(), torch.full((3, 1), row.next_pos))


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    """The suite's tiny Qwen3-VL pair (patch 16, deepstack from both vision blocks) given a video processor."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from sgl_cli.engine.core.processors import load_processor
    from tests.families import build_family

    pair = build_family("qwen3_vl", tmp_path_factory.mktemp("qwen3"))
    for role in ("small", "large"):
        p = load_processor(pair[role])
        # Qwen3-VL's video processor bounds the pixels of all frames together.
        vp = Qwen3VLVideoProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 16 * 128 * 128}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2)
        template = p.chat_template.replace("{% elif part['type'] == 'text' %}",
                                           VIDEO_PART + "{% elif part['type'] == 'text' %}")
        Qwen3VLProcessor(image_processor=p.image_processor, tokenizer=p.tokenizer, video_processor=vp,
                         chat_template=template).save_pretrained(pair[role])
    return pair


def test_qwen3_vl_video_items_answer_as_plain_generate_and_batch_as_batch_one(qwen3_pair, clips):
    """Qwen3-VL writes each temporal patch's tokens after a timestamp: retain 1.0 equals plain `generate` (the
    deepstack features of the video's tokens included), every token is in exactly one patch's grid, and a pruned
    batch gives batch 1's records."""
    from sgl_cli.engine import read_items

    loaded = ("qwen3_vl", _models(qwen3_pair))
    assert len(_retain_one_is_plain_generate(loaded, clips)) == 3
    eng = _engine(loaded, retain=1.0)
    large = eng.large
    works = eng.prepare(list(read_items(clips / "in.jsonl")))
    for w in works:
        grids = large.family.token_grids(large.model, w.encoded.large)
        tokens = sorted(t for g in grids for t in g.tokens.ravel().tolist())
        assert tokens == list(range(w.encoded.n_visual))
        if w.encoded.video is not None:
            assert sum(g.name.startswith("frames") for g in grids) == int(w.encoded.large["video_grid_thw"][0, 0])

    def run(batch):
        return list(_engine(loaded, retain=0.3, batch_size=batch).run(read_items(clips / "in.jsonl")))

    for a, b in zip(run(1), run(4)):
        for key in ("answer", "small_answer", "visual_tokens", "retained_tokens", "error"):
            assert a[key] == b[key], key


def test_streaming_gives_the_serial_records_with_videos(loaded, clips):
    """The streaming pipeline drops what waits in its window but what the large model reads: on transformers the
    video's pixels, not its frames; the records are the serial pipeline's."""
    from sgl_cli.engine import read_items

    def run(pipeline):
        eng = _engine(loaded, retain=0.3, batch_size=2, pipeline=pipeline)
        return [{k: v for k, v in r.items() if k != "ms"} for r in eng.run(read_items(clips / "in.jsonl"))]

    serial, streamed = run("serial"), run("streaming")
    assert [r["error"] for r in serial] == [None] * 4
    assert streamed == serial


def test_vllm_streaming_reads_the_frames_it_kept(vllm_video, clips):
    """On vLLM the streaming window keeps a video's frames (vLLM encodes them itself) and drops its pixels; the
    records equal the serial pipeline's."""
    from sgl_cli.engine import read_items

    _, v, _ = vllm_video

    def run(pipeline):
        eng = v.with_settings(retain=0.3, pipeline=pipeline, batch_size=2)
        return [{k: x for k, x in r.items() if k != "ms"} for r in eng.run(read_items(clips / "in.jsonl"))]

    serial, streamed = run("serial"), run("streaming")
    assert [r["error"] for r in serial] == [None] * 4
    assert streamed == serial


def test_downsample_refuses_video_items_on_both_backends_and_answers_the_picture(loaded, vllm_video, clips):
    """downsample reduces images, not a video's frames: each video item is one error record saying so, on either
    large backend, and the picture-only item is answered."""
    from sgl_cli.engine import read_items

    _, v, _ = vllm_video
    message = "the downsample guide does not reduce videos yet (sgl, random and fastv rank a video's tokens)"
    for eng in (_engine(loaded, guide="downsample", retain=0.25), v.with_settings(guide="downsample", retain=0.25)):
        recs = list(eng.run(read_items(clips / "in.jsonl")))
        assert [r["error"] for r in recs] == [f"line {i}: {message}" if i != 3 else None for i in (1, 2, 3, 4)]
        assert recs[2]["answer"] is not None
