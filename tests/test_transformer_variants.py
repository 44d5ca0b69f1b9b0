"""The StableAvatar transformer against stock diffusers, and its fused-projection path against the plain one."""

from __future__ import annotations

import pytest
import torch

from avatarcli.loading.transformer import build_transformer
from avatarcli.models.stableavatar import AudioConditioning
from avatarcli.testing import TINY_STABLEAVATAR
from avatarcli.testing.stableavatar import random_state_dict, stock_wan_twin, wan_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def model():
    return build_transformer(random_state_dict(TINY_STABLEAVATAR, seed=3), wan_config(TINY_STABLEAVATAR))


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    s = TINY_STABLEAVATAR
    x = torch.randn(1, 36, 5, 8, 8, generator=g).expand(3, -1, -1, -1, -1)
    t = torch.full((3,), 977.9)
    text = torch.randn(3, 512, s["text_dim"], generator=g)
    image = torch.randn(3, 257, s["image_dim"], generator=g)
    audio = AudioConditioning(torch.randn(2, 33, s["audio_in_dim"], generator=g), [None, 0, 1])
    return x, t, text, image, audio


def test_without_audio_the_forward_is_stock_diffusers_wan(model, inputs):
    x, t, text, image, _ = inputs
    stock = stock_wan_twin(model)
    assert stock.blocks[0].ffn.net[0].proj.weight.data_ptr() == model.blocks[0].ffn.net[0].proj.weight.data_ptr()
    with torch.no_grad():
        ours = model(x, t, text, image, None)
        theirs = stock(x, t, text, image, return_dict=False)[0]
    # Only the time embedding differs: ours is computed in float64 like the reference, diffusers' in float32.
    assert 0 < rel_err(ours, theirs) < 1e-5


def test_fused_projections_give_the_plain_forward_and_unfuse_restores_it(model, inputs):
    with torch.no_grad():
        plain = model(*inputs)
        model.fuse_qkv_projections()
        assert all(hasattr(b.attn2, "to_vocal_kv") and b.attn2.fused_projections for b in model.blocks)
        fused = model(*inputs)
        model.unfuse_qkv_projections()
        assert not any(hasattr(b.attn2, "to_vocal_kv") for b in model.blocks)
        again = model(*inputs)
    assert rel_err(fused, plain) < 1e-6
    assert torch.equal(again, plain)



@pytest.fixture
def bf16_model():
    """The tiny model as the loader builds it in bf16 (diffusers' float32 modules kept float32), and one branch."""
    model = build_transformer(random_state_dict(TINY_STABLEAVATAR, seed=3), wan_config(TINY_STABLEAVATAR),
                              dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    s = TINY_STABLEAVATAR
    inputs = (torch.randn(1, 36, 5, 8, 8, generator=g).bfloat16(), torch.full((1,), 977.9),
              torch.randn(1, 512, s["text_dim"], generator=g).bfloat16(),
              torch.randn(1, 257, s["image_dim"], generator=g).bfloat16(),
              AudioConditioning(torch.randn(1, 33, s["audio_in_dim"], generator=g), [0]))
    return model, inputs


def test_fast_numerics_stay_close_to_the_reference_and_switching_back_restores_it(bf16_model):
    from avatarcli.models.wan import FastNumerics, ReferenceNumerics, use_numerics

    model, inputs = bf16_model
    with torch.no_grad():
        reference = model(*inputs)
        use_numerics(model, "fast")
        assert model.numerics is FastNumerics and all(b.numerics is FastNumerics for b in model.blocks)
        fast = model(*inputs)
        use_numerics(model, "reference")
        again = model(*inputs)
    assert 0 < rel_err(fast, reference) < 2e-2
    assert torch.equal(again, reference) and model.blocks[0].numerics is ReferenceNumerics
    with pytest.raises(ValueError, match="numerics must be one of reference, fast"):
        use_numerics(model, "fp16")


def test_in_float32_the_fast_numerics_are_the_reference(model, inputs):
    from avatarcli.models.wan import use_numerics

    with torch.no_grad():
        reference = model(*inputs)
        use_numerics(model, "fast")
        fast = model(*inputs)
    assert rel_err(fast, reference) < 1e-6


def test_fast_numerics_trace_as_one_graph_per_block(bf16_model):
    """torch.compile of the repeated blocks (as --compile runs them) captures the fast blocks without a graph break;
    the eager backend keeps the check quick and the output equal."""
    from avatarcli.models.wan import use_numerics

    model, inputs = bf16_model
    use_numerics(model, "fast")
    with torch.no_grad():
        eager = model(*inputs)
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = model(*inputs)
    assert torch.equal(compiled, eager)


def test_the_preset_schema_names_exactly_the_numerics_the_model_has():
    from avatarcli.models.wan import NUMERICS
    from avatarcli.presets import NUMERICS_MODES

    assert tuple(NUMERICS) == NUMERICS_MODES
