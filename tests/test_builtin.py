"""The built-in pair's rotary spectrum: `spatial_freqs` sets M-RoPE's row and column frequencies exactly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AutoModelForImageTextToText

from sgl_cli.engine.builtin.pair import TINY_SPEC, TRAINED_SPEC, build_config, build_processor


def _rotary(spec, lm):
    config = build_config(spec, lm, build_processor(spec).tokenizer)
    return AutoModelForImageTextToText.from_config(config).model.language_model.rotary_emb, config


def _angles(rotary, t, h, w):
    """The rotation angle of every rotary pair at M-RoPE position (t, h, w), as transformers' rotary embedding
    composes it from the three sections."""
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.tensor([t, h, w]).view(3, 1, 1))
    half = cos.shape[-1] // 2
    return torch.atan2(sin[0, 0, :half], cos[0, 0, :half]).double()


def _step(rotary, a, b):
    """Per-pair rotation from position a to b, wrapped to (-pi, pi]."""
    d = _angles(rotary, *b) - _angles(rotary, *a)
    return torch.remainder(d + math.pi, 2 * math.pi) - math.pi


@pytest.mark.parametrize("spec", [TRAINED_SPEC, TINY_SPEC], ids=["trained", "tiny"])
def test_spatial_freqs_set_the_row_and_column_rotation(spec):
    rotary, config = _rotary(spec, spec.small)
    section = config.text_config.rope_parameters["mrope_section"]
    head_dim = spec.small.hidden // spec.small.heads
    k = len(spec.spatial_freqs)
    assert k > 0
    theta = [10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    # One column to the right moves only the w section (one row down only the h section): its first k pairs by
    # exactly spatial_freqs, the rest by theta's frequencies; the other sections do not move.
    for moved, first, size in (((5, 5, 6), section[0] + section[1], section[2]), ((5, 6, 5), section[0], section[1])):
        want = [0.0] * (head_dim // 2)
        for i in range(first, first + size):
            want[i] = spec.spatial_freqs[i - first] if i - first < k else theta[i]
        step = _step(rotary, (5, 5, 5), moved)
        assert torch.allclose(step, torch.tensor(want, dtype=torch.float64), atol=1e-5), moved
    assert rotary.attention_scaling == 1.0  # no length rescaling


def test_default_spectrum_without_spatial_freqs():
    spec = dataclasses.replace(TRAINED_SPEC, spatial_freqs=())  # train_pair's stages 1-3
    rotary, config = _rotary(spec, spec.small)
    assert config.text_config.rope_parameters["rope_type"] == "default"
    head_dim = spec.small.hidden // spec.small.heads
    want = torch.tensor([10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    assert torch.allclose(rotary.inv_freq, want)


def test_too_many_spatial_freqs_is_refused():
    spec = dataclasses.replace(TINY_SPEC, spatial_freqs=(1.0, 0.5, 0.25, 0.125))  # head_dim 16: 3 pairs
    with pytest.raises(ValueError, match="spatial_freqs has 4 entries"):
        build_config(spec, spec.small, build_processor(spec).tokenizer)


def test_saved_config_keeps_the_spectrum(tmp_path):
    rotary, config = _rotary(TINY_SPEC, TINY_SPEC.large)
    config.save_pretrained(tmp_path)
    from transformers import AutoConfig

    again = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tmp_path))
    assert torch.equal(again.model.language_model.rotary_emb.inv_freq, rotary.inv_freq)
    assert not math.isclose(float(rotary.inv_freq.max()), 1.0)  # the raised 1.6 rad pair is there


@pytest.mark.parametrize("role", ["small", "large"])
def test_shipped_pair_carries_the_trained_spectrum(role):
    """The shipped weights were trained with TRAINED_SPEC's rotary spectrum: their config must say so, or a
    checkpoint and the spec that documents it have drifted apart."""
    from transformers import AutoConfig

    from sgl_cli.engine.builtin.pair import SHIPPED

    shipped = AutoConfig.from_pretrained(SHIPPED["default"] / role).text_config
    lm = getattr(TRAINED_SPEC, role)
    built = build_config(TRAINED_SPEC, lm, build_processor(TRAINED_SPEC).tokenizer).text_config
    assert shipped.rope_parameters == built.rope_parameters
    assert (shipped.hidden_size, shipped.num_hidden_layers) == (lm.hidden, lm.layers)
