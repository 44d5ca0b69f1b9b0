"""2D and 3D convolutions on the CPU through oneDNN on channels-last tensors.

For a float32 convolution of batch 1, PyTorch takes oneDNN only when N x C x D x H of the input exceeds 20480;
below that it runs its generic im2col + GEMM kernel. Every convolution of a small VAE's streaming decode (one latent
frame at a time, tens of channels, 6 frames with the causal cache, 128 rows) falls below it, and so does much of the
real VAE's at small sizes. oneDNN on channels-last tensors decodes the demo VAE 3-7x faster on 2 cores
(benchmarks/bench_demo_cpu.py). Its sums are ordered differently: decoded frames differ from the generic kernel's
by float rounding, at most 1 of 255 in about 0.01% of the pixels. Both the whole-video and the streaming decode go
through the same modules, so they stay identical to each other (and a resumed stream to an uninterrupted one).

On any other device, dtype or padding mode a convolution runs PyTorch's own path unchanged.
"""

from __future__ import annotations

import torch

_LAYOUT = {4: torch.channels_last, 5: torch.channels_last_3d}


class OneDNNConvolution:
    """Installed as a Conv2d / Conv3d's `_conv_forward`: oneDNN for float32 CPU inputs, PyTorch's path otherwise."""

    def __init__(self, conv: torch.nn.Conv2d | torch.nn.Conv3d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        conv = self.conv
        if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return type(conv)._conv_forward(conv, x, weight, bias)
        layout = _LAYOUT[x.dim()]
        return torch.mkldnn_convolution(x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout),
                                        bias, conv.padding, conv.stride, conv.dilation, conv.groups)


def use_onednn_convolutions(module: torch.nn.Module) -> int:
    """Route `module`'s zero-padded Conv2d / Conv3d layers through oneDNN on the CPU (module docstring); returns how
    many. A no-op (0) where PyTorch was built without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for conv in module.modules():
        if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) and conv.padding_mode == "zeros" \
                and not isinstance(conv.padding, str):
            conv._conv_forward = OneDNNConvolution(conv)
            count += 1
    return count
