"""The fp8 path's parts that run without a GPU: the self-attention processor around the fp8 kernel, the e4m3
rounding scheme (emulated), and which layers it touches. The cuDNN and torchao kernels themselves are measured by
benchmarks/bench_transformer.py --precision fp8 on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avatarcli.errors import EnvironmentProblem
from avatarcli.loading.transformer import build_transformer
from avatarcli.models.fp8 import (E4M3_MAX, EmulatedFp8Linear, Fp8SelfAttnProcessor, check_fp8_support, emulated,
                                  emulated_fp8_attention, kernel_for, smooth_kv, smoothed_attention, tensor_scale,
                                  use_fp8)
from avatarcli.models.stableavatar import AudioConditioning
from avatarcli.testing import TINY_STABLEAVATAR
from avatarcli.testing.stableavatar import random_state_dict, wan_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def model():
    return build_transformer(random_state_dict(TINY_STABLEAVATAR, seed=5), wan_config(TINY_STABLEAVATAR))


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    s = TINY_STABLEAVATAR
    return (torch.randn(3, 36, 5, 8, 8, generator=g), torch.full((3,), 500.0),
            torch.randn(3, 512, s["text_dim"], generator=g), torch.randn(3, 257, s["image_dim"], generator=g),
            AudioConditioning(torch.randn(1, 33, s["audio_in_dim"], generator=g), [None, 0, 0]))


def exact_attention(query, key, value):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)


@pytest.mark.parametrize("fused", [False, True])
def test_the_fp8_processor_is_diffusers_self_attention_around_another_kernel(model, inputs, fused):
    with torch.no_grad():
        if fused:
            model.fuse_qkv_projections()
        reference = model(*inputs)
        for block in model.blocks:
            processor = Fp8SelfAttnProcessor("emulate")
            processor.attend = exact_attention  # the kernel is the only difference left
            block.attn1.set_processor(processor)
        assert torch.allclose(model(*inputs), reference, rtol=0, atol=1e-5)


def test_e4m3_rounding_keeps_three_mantissa_bits_and_the_range():
    x = torch.linspace(-3.0, 5.0, 1001)
    scale = tensor_scale(x)
    assert scale.item() == pytest.approx(E4M3_MAX / 5.0)
    y = emulated(x, scale)
    assert y.abs().max().item() == pytest.approx(5.0)
    relative = ((y - x).abs() / x.abs().clamp_min(0.05)).max().item()
    assert 0 < relative <= 2**-4  # round to nearest with 3 mantissa bits (normal range)


def test_emulated_fp8_changes_every_block_linear_and_self_attention_and_stays_close(model, inputs):
    with torch.no_grad():
        reference = model(*inputs)
        done = use_fp8(model, kernel="emulate")
        out = model(*inputs)
    # Per block: self-attention q, k, v, o; cross-attention q, o; the two feed-forward layers.
    assert done == {"linear_layers": 8 * len(model.blocks), "attention_layers": len(model.blocks)}
    assert isinstance(model.blocks[0].attn2.to_out[0], EmulatedFp8Linear)
    assert not isinstance(model.blocks[0].attn2.to_k, EmulatedFp8Linear)  # cross-attention contexts stay as they are
    assert not isinstance(model.proj_out, EmulatedFp8Linear)
    assert 1e-4 < rel_err(out, reference) < 0.1


def offset_qkv(offset: float, seed: int = 0):
    """[B, S, H, D] q, k, v; k and v shifted by `offset` times a random vector per head and channel."""
    g = torch.Generator().manual_seed(seed)
    shape = (2, 256, 2, 32)
    q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    return (q, k + offset * torch.randn(1, 1, 2, 32, generator=g), v + offset * torch.randn(1, 1, 2, 32, generator=g))


def test_smoothing_k_and_v_is_exact_without_rounding():
    q, k, v = offset_qkv(4.0)
    k_smooth, v_smooth, v_mean = smooth_kv(k, v)
    assert k_smooth.mean(dim=1).abs().max() < 1e-5 and v_smooth.mean(dim=1).abs().max() < 1e-5
    assert torch.allclose(smoothed_attention(exact_attention, q, k, v), exact_attention(q, k, v), rtol=0, atol=1e-5)


def test_smoothing_lowers_the_e4m3_error_of_keys_and_values_with_an_offset():
    q, k, v = offset_qkv(4.0)
    exact = exact_attention(q, k, v)
    plain = rel_err(emulated_fp8_attention(q, k, v), exact)
    smoothed = rel_err(smoothed_attention(emulated_fp8_attention, q, k, v), exact)
    assert smoothed < plain / 2


def test_the_fp8_processor_smooths_by_default(model):
    use_fp8(model, linear=False, kernel="emulate")
    assert model.blocks[0].attn1.processor.smooth
    use_fp8(model, linear=False, kernel="emulate", smooth=False)
    assert not model.blocks[0].attn1.processor.smooth


def test_the_cpu_gets_the_emulated_kernel():
    assert kernel_for(torch.device("cpu")) == "emulate"


def test_fp8_needs_a_cuda_gpu():
    with pytest.raises(EnvironmentProblem, match="needs a CUDA GPU"):
        check_fp8_support(torch.device("cpu"))
