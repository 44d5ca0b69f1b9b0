"""The full VAE decoder's speed levers (avatarcli/decode/speed.py): which a job's setting asks for, and that they
touch nothing off CUDA."""

import pytest
import torch

from avatarcli.decode.speed import AUTO_LEVERS, DECODE_LEVERS, choose_levers, speed_up_decoder


def test_auto_compiles_the_decoder_only_where_the_dit_is_compiled_and_frames_decode_whole():
    assert set(AUTO_LEVERS) <= set(DECODE_LEVERS)
    assert choose_levers("auto", compiled=True, tiled=False) == AUTO_LEVERS
    auto = ("cudnn", "compile")
    assert choose_levers("auto", compiled=True, tiled=False, auto=auto) == auto
    assert choose_levers("auto", compiled=False, tiled=False, auto=auto) == ("cudnn",)
    assert choose_levers("auto", compiled=True, tiled=True, auto=auto) == ("cudnn",)


def test_none_and_explicit_levers():
    assert choose_levers("none", compiled=True, tiled=False) == ()
    assert choose_levers("cudnn+channels_last", compiled=False, tiled=True) == ("cudnn", "channels_last")


def test_an_unknown_lever_is_refused_by_name(tiny_vae):
    with pytest.raises(ValueError, match="fused"):
        speed_up_decoder(tiny_vae, ("cudnn", "fused"))


def test_on_the_cpu_no_lever_applies_and_the_decoder_is_untouched(tiny_vae):
    before = {name: value.clone() for name, value in tiny_vae.decoder.state_dict().items()}
    cudnn = torch.backends.cudnn.benchmark
    assert speed_up_decoder(tiny_vae, ("cudnn", "channels_last", "compile")) == ()
    assert torch.backends.cudnn.benchmark == cudnn
    assert getattr(tiny_vae.decoder, "_compiled_call_impl", None) is None
    assert not tiny_vae.decoder._forward_pre_hooks
    after = tiny_vae.decoder.state_dict()
    assert all(torch.equal(before[name], after[name]) and after[name].is_contiguous() for name in before)


@pytest.fixture
def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
