"""Train the embedded demo model (avatarcli/demo/weights) on the synthetic talking-face world.

    python benchmarks/train_demo.py --out demo-weights            # one GPU, about 14.5 minutes on an H200
    python benchmarks/train_demo.py --out /tmp/w --tiny           # a few iterations on CPU (smoke test)

Everything is generated from --seed; see avatarcli/demo/training/ for the stages. Prints progress and a JSON summary;
the folder it writes is in the published StableAvatar layout and is checked by loading it through the real loaders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from avatarcli.demo.training import TrainConfig, train, verify, with_overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the weights (published StableAvatar layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, a few iterations, CPU")
    parser.add_argument("--identities", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--vae-seconds", type=float)
    parser.add_argument("--dit-seconds", type=float)
    parser.add_argument("--audio-steps", type=int)
    parser.add_argument("--dit-batch", type=int)
    parser.add_argument("--device")
    parser.add_argument("--init", help="continue from this weights folder (VAE decoder and DiT train on)")
    parser.add_argument("--vae-lr", type=float)
    parser.add_argument("--dit-lr", type=float)
    parser.add_argument("--vae-episode-latents", type=int, help="latent frames of each clip streamed through the VAE")
    parser.add_argument("--vae-grad-latents", type=int, help="latent frames of the stream per VAE step")
    args = parser.parse_args()
    config = TrainConfig.tiny() if args.tiny else TrainConfig()
    config = with_overrides(config, seed=args.seed, identities=args.identities, workers=args.workers,
                            vae_seconds=args.vae_seconds, dit_seconds=args.dit_seconds, audio_steps=args.audio_steps,
                            dit_batch=args.dit_batch, device=args.device, init=args.init, vae_lr=args.vae_lr,
                            dit_lr=args.dit_lr, vae_episode_latents=args.vae_episode_latents,
                            vae_grad_latents=args.vae_grad_latents)
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {line}", flush=True)

    summary = train(args.out, config, log)
    verify(args.out)
    log("weights load strictly through avatarcli.loading")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
