"""Load the tiny video decoder (`fast_vae.pth`, TAEHV) strictly.

The published file is a plain pickled state dict holding the encoder and the decoder under the reference module's
own names (`encoder.<i>.*`, `decoder.<i>.*`). Only the decoder is used: the `encoder.*` keys are dropped by name,
everything else must match `TAEHVDecoder` exactly (0 missing, 0 unexpected, equal shapes). Widths are read from
the tensor shapes, so the tiny test files in the same layout load through the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.files import check_state_dict, read_state_dict
from avatarcli.models.taehv import TAEHVConfig, TAEHVDecoder

FAST_VAE_FILE = "fast_vae.pth"
ENCODER_PREFIX = "encoder."

# Published layout: decoder.1 first conv, decoder.{8,14,20} the width-changing convs, decoder.{13,19} the TGrows.
_WIDTH_KEYS = ("decoder.1.weight", "decoder.8.weight", "decoder.14.weight", "decoder.20.weight")
_TGROW_KEYS = ("decoder.13.conv.weight", "decoder.19.conv.weight")


def decoder_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without the encoder half (dropped by name; anything else is kept for the strict check)."""
    return {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}


def config_from_state_dict(state: Mapping[str, torch.Tensor], source: str | Path = "state dict") -> TAEHVConfig:
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source} lacks {key!r}; is it a TAEHV (taew2_1) tiny video decoder?")
        return tuple(state[key].shape)

    widths = tuple(shape(key)[0] for key in _WIDTH_KEYS)
    strides = tuple(shape(key)[0] // shape(key)[1] for key in _TGROW_KEYS)
    return TAEHVConfig(latent_channels=shape("decoder.1.weight")[1], widths=widths, time_strides=strides,
                       image_channels=shape("decoder.22.weight")[0])


def build_tiny_decoder(state: Mapping[str, torch.Tensor], *, source: str | Path = "state dict",
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> TAEHVDecoder:
    """A TAEHVDecoder holding `state` (encoder keys dropped), checked strictly."""
    state = decoder_state_dict(state)
    config = config_from_state_dict(state, source)
    if config.image_channels != 3:
        raise CheckpointError(f"{source} decodes {config.image_channels} channels, not RGB: only the Wan2.1 "
                              "tiny decoder (taew2_1) is supported")
    with torch.device("meta"):
        model = TAEHVDecoder(config)
    check_state_dict(model, state, source)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_tiny_decoder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> TAEHVDecoder:
    """Load `fast_vae.pth` (pickles only with weights_only=True, through loading/files.py)."""
    return build_tiny_decoder(read_state_dict(path), source=path, dtype=dtype, device=device)
