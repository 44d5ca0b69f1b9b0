"""Faster full-VAE decodes on CUDA: levers that change how the Wan VAE decoder runs, not what it computes.

    speed_up_decoder(vae, ("cudnn", "channels_last", "compile"))

  * "cudnn": cuDNN autotunes its convolution algorithms for the decoder's shapes (`torch.backends.cudnn.benchmark`,
    a process-wide switch: the DiT has no convolutions worth the name, so it touches nothing else).
  * "channels_last": the decoder's weights and its input frames in the channels-last-3d layout, the one tensor-core
    convolutions read without a transpose.
  * "compile": the decoder torch.compile'd as one graph per cache state (the first latent frame, the second, every
    later one: three compiles, the first time a stream reaches each).

None of them is bit for bit against the eager decode (other kernels sum in another order); benchmarks/bench_decode.py
measures each one's time per latent frame and its PSNR against the eager decode. On the CPU they are not applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

DECODE_LEVERS = ("cudnn", "channels_last", "compile")

# Compiled graphs the decoder may hold (one per cache state, per frame size and dtype): above dynamo's default of 8,
# so that a batch of a few sizes does not fall back to eager.
RECOMPILE_LIMIT = 32


# What `decode_levers: auto` applies on a GPU, "compile" only where the DiT is compiled too (the job repays compiling:
# avatarcli/compilation.py) and the frames are decoded whole, not in tiles. None until benchmarks/bench_decode.py has
# measured them on a GPU.
AUTO_LEVERS: tuple[str, ...] = ()


def choose_levers(setting: str, compiled: bool, tiled: bool, auto: tuple[str, ...] = AUTO_LEVERS) -> tuple[str, ...]:
    """The levers a job's `decode_levers` setting asks for: "auto" (`auto`, as above), "none", or levers joined by
    "+"."""
    if setting == "none":
        return ()
    if setting != "auto":
        return tuple(setting.split("+"))
    return tuple(lever for lever in auto if lever != "compile" or (compiled and not tiled))


def _to_channels_last(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    hidden = args[0].contiguous(memory_format=torch.channels_last_3d)
    return (hidden, *args[1:]), kwargs


def speed_up_decoder(vae: Any, levers: Iterable[str]) -> tuple[str, ...]:
    """Apply `levers` (DECODE_LEVERS) to `vae.decoder` in place; returns those in effect (none off CUDA). A lever
    already applied to this decoder (a batch's next job on the same VAE) is not applied twice."""
    levers = tuple(levers)
    unknown = sorted(set(levers) - set(DECODE_LEVERS))
    if unknown:
        raise ValueError(f"unknown decode lever(s) {', '.join(unknown)}; choose from {', '.join(DECODE_LEVERS)}")
    decoder = vae.decoder
    if next(decoder.parameters()).device.type != "cuda":
        return ()
    applied = getattr(decoder, "_avatarcli_levers", ())
    decoder._avatarcli_levers = applied + tuple(lever for lever in levers if lever not in applied)
    levers = tuple(lever for lever in levers if lever not in applied)
    if "cudnn" in levers:
        torch.backends.cudnn.benchmark = True
    if "channels_last" in levers:
        decoder.to(memory_format=torch.channels_last_3d)
        decoder.register_forward_pre_hook(_to_channels_last, with_kwargs=True)
    if "compile" in levers:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        decoder.compile(dynamic=False)
    return decoder._avatarcli_levers
