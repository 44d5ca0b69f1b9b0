"""TAEHV: the tiny video decoder of FlashPortrait's 4-step path (`fast_vae.pth`, madebyollin's "taew2_1").

A stack of 2D convolutions applied to every latent frame, with three kinds of temporal coupling:
  * MemBlock: a residual block that also sees its own input of the previous frame (zeros before the first frame),
  * TGrow: a 1x1 conv that turns each frame into `stride` frames (x4 in time over two of them),
  * nearest-neighbour upsampling x2 in space, three times (x8).
There is no attention and no causal 3D conv, so the only state a streaming decode must carry from one chunk to the
next is each MemBlock's last input frame (`DecoderMemory`).

It decodes the NORMALISED latents the DiT works in (no latent mean/std, unlike the full Wan VAE) and returns
frames in [0, 1]. Diffusers (0.42) ships only TAESD (`AutoencoderTiny`, per-image, no temporal blocks), which cannot
hold these weights, so the module is ours. Its `decoder.<index>` layout is the published file's, so
`fast_vae.pth` loads into it strictly once the `encoder.*` half is dropped (avatarcli/loading/taehv.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Per MemBlock of the decoder (in order), its input at the last frame decoded so far, [N, C, h, w]; None = video start.
DecoderMemory = list[torch.Tensor]


def conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the input latents to about [-3, 3]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv(cat(x_t, x_{t-1})) + x_t): a residual block with one frame of memory of its own input."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv3x3(2 * n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(),
                                  conv3x3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TGrow(nn.Module):
    """Each input frame becomes `stride` consecutive output frames (channel group g -> frame g)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames, channels, height, width = x.shape
        return self.conv(x).reshape(frames * self.stride, channels, height, width)


@dataclass(frozen=True)
class TAEHVConfig:
    """Sizes of the published Wan2.1 decoder by default; tiny test files shrink the widths only."""

    latent_channels: int = 16
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    time_strides: tuple[int, int] = (2, 2)  # the two time-growing TGrows (x4 frames in all)
    image_channels: int = 3

    @property
    def frames_to_trim(self) -> int:
        """Frames before the first real one: latent frame 0 decodes to 4 frames, of which only the last is kept,
        which makes the count 4(T-1)+1 like the full Wan VAE."""
        return self.time_strides[0] * self.time_strides[1] - 1


class TAEHVDecoder(nn.Module):
    """The TAEHV decoder. `forward` decodes latent frames given the memory of the frames before them."""

    def __init__(self, config: TAEHVConfig = TAEHVConfig()) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.widths
        s1, s2 = config.time_strides

        def stage(width: int) -> list[nn.Module]:
            return [MemBlock(width, width) for _ in range(3)]

        # Indices (and so state-dict names) follow the published file: decoder.1 is the first conv, decoder.22 the last.
        self.decoder = nn.Sequential(
            Clamp(), conv3x3(config.latent_channels, c0), nn.ReLU(),
            *stage(c0), nn.Upsample(scale_factor=2), TGrow(c0, 1), conv3x3(c0, c1, bias=False),
            *stage(c1), nn.Upsample(scale_factor=2), TGrow(c1, s1), conv3x3(c1, c2, bias=False),
            *stage(c2), nn.Upsample(scale_factor=2), TGrow(c2, s2), conv3x3(c2, c3, bias=False),
            nn.ReLU(), conv3x3(c3, config.image_channels),
        )  # fmt: skip

    def forward(self, latents: torch.Tensor, memory: DecoderMemory | None = None) -> tuple[torch.Tensor, DecoderMemory]:
        """Latents [N, C, T, h, w] -> (frames [N, 3, sT, 8h, 8w] in [0, 1] untrimmed, memory after the last frame).

        All frames of the chunk go through each layer at once; a MemBlock's "previous frame" input is the chunk's
        own input shifted by one frame, with `memory` (zeros when None: the start of the video) in front.
        """
        batch, _, frames, _, _ = latents.shape
        x = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [N*T, C, h, w], frame-major within each batch item
        new_memory: DecoderMemory = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                per_item = x.unflatten(0, (batch, -1))
                past = torch.zeros_like(per_item[:, 0]) if memory is None else memory[len(new_memory)]
                shifted = torch.cat([past[:, None].to(x), per_item[:, :-1]], dim=1).flatten(0, 1)
                new_memory.append(per_item[:, -1].clone())
                x = layer(x, shifted)
            else:
                x = layer(x)
        video = x.unflatten(0, (batch, -1)).permute(0, 2, 1, 3, 4)
        return video.clamp(0, 1), new_memory

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole normalised latent video [N, C, T, h, w] -> [N, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], the reference's
        `decode` convention (the first `frames_to_trim` frames dropped)."""
        video, _ = self(latents)
        return video[:, :, self.config.frames_to_trim :] * 2 - 1
