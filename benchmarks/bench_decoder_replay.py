"""Resume state of the streaming VAE decoder: the replay horizon, its size, and the time a resume spends replaying.

    python benchmarks/bench_decoder_replay.py                         # CUDA: full-size Wan2.1 VAE at 480x832, bf16
    python benchmarks/bench_decoder_replay.py --tiny                  # CPU: tiny VAE, small frames

A resume does not load the decoder's causal cache: it replays the last `replay_frames` latent frames into an empty
cache (avatarcli/decode/stream.py). This script, with random weights (the horizon is a property of the architecture):

1. probes, at a small spatial size, the smallest replay that rebuilds the cache of a long stream bit for bit, against
   the horizon the decoder uses (an upper bound from its convolutions' look-backs);
2. at `--size`, saves a stream's state and reports the bytes of the replay frames against the bytes of the cache
   itself, and times the replay of a resume (load_state_dict) beside the decode of one latent frame.
"""

from __future__ import annotations

import argparse
import time

import torch

from avatarcli.decode.stream import StreamingDecoder
from avatarcli.runtime import quiet_diffusers

from common import synchronize


def caches_equal(a: StreamingDecoder, b: StreamingDecoder) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(a._feat_cache, b._feat_cache, strict=True))


def smallest_exact_replay(vae, generator: torch.Generator) -> int | None:
    """The fewest trailing latent frames whose replay gives the uninterrupted stream's cache (4x6 latents)."""
    horizon = StreamingDecoder(vae).replay_frames
    latents = torch.randn(1, vae.config.z_dim, horizon + 4, 4, 6, generator=generator).to(vae.device, vae.dtype)
    stream = StreamingDecoder(vae)
    stream.push(latents)
    state = stream.state_dict()
    for frames in range(1, horizon + 1):
        replay = StreamingDecoder(vae)
        replay.replay_frames = frames
        replay.load_state_dict(dict(state, replay=state["replay"][:, :, -frames:], replay_frames=frames))
        if caches_equal(replay, stream):
            return frames
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="480x832", help="WxH of the video")
    parser.add_argument("--dtype", default="bfloat16", help="decoder dtype (the GPU decode copy is bf16)")
    parser.add_argument("--tiny", action="store_true", help="CPU, a tiny VAE, 64x64")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.tiny:
        args.size = "64x64"
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    else:
        vae = AutoencoderKLWan()  # the Wan2.1 VAE configuration
    with quiet_diffusers():  # its warning about casting with .to(): nothing in the Wan VAE needs float32
        vae = vae.to(device=device, dtype=dtype).eval()
    generator = torch.Generator().manual_seed(1)

    horizon = StreamingDecoder(vae).replay_frames
    exact = smallest_exact_replay(vae, generator)

    width, height = (int(v) for v in args.size.split("x"))
    scale = vae.config.scale_factor_spatial
    frames = horizon + 2
    latents = torch.randn(1, vae.config.z_dim, frames, height // scale, width // scale, generator=generator)
    latents = latents.to(device, dtype)
    stream = StreamingDecoder(vae)
    stream.push(latents[:, :, : frames - 1])
    synchronize(device)
    tick = time.perf_counter()
    stream.push(latents[:, :, frames - 1 :])
    synchronize(device)
    one_frame = time.perf_counter() - tick
    state = stream.state_dict()
    replay_bytes = state["replay"].numel() * state["replay"].element_size()
    cache_bytes = sum(t.numel() * t.element_size() for t in stream._feat_cache if isinstance(t, torch.Tensor))
    resumed = StreamingDecoder(vae)
    synchronize(device)
    tick = time.perf_counter()
    resumed.load_state_dict(state)
    synchronize(device)
    replay_seconds = time.perf_counter() - tick
    identical = caches_equal(resumed, stream)

    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{'VAE'} {'tiny' if args.tiny else 'Wan2.1'}, {where}, {args.size}, {str(dtype).split('.')[-1]}")
    print("| horizon (latent frames) | smallest exact replay (probe, 4x6 latents) | replay frames MB | cache MB | "
          "resume replay s | one latent frame decode s | rebuilt cache identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {horizon} | {exact if exact is not None else 'none'} | {replay_bytes / 2**20:.1f} | "
          f"{cache_bytes / 2**20:.1f} | {replay_seconds:.2f} | {one_frame:.3f} | {'yes' if identical else 'NO'} |")


if __name__ == "__main__":
    main()
