"""Train the embedded demo model (avatarcli/demo/weights) on the synthetic talking-face world.

    python benchmarks/train_demo.py --out demo-weights --minutes 9   # one GPU, the whole run held to 9 minutes
    python benchmarks/train_demo.py --out /tmp/w --tiny              # a few iterations on CPU (smoke test)
    python benchmarks/train_demo.py --out demo --minutes 15 --stop-after vae   # then the same command without
    python benchmarks/train_demo.py --out demo --minutes 15                    # --stop-after goes on from the VAE

Everything is generated from --seed; see avatarcli/demo/training/ for the stages. Prints the expected H200 time of
each stage, progress, and a JSON summary; the folder it writes is in the published StableAvatar layout and is checked
by loading it through the real loaders. Without --minutes each stage runs to its own budget (--vae-seconds,
--dit-seconds); with it, the VAE and the DiT share what the run has left in the ratio of those two.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # --minutes counts from here, the imports included

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import replace  # noqa: E402

from avatarcli.demo.training import TrainConfig, train, verify, with_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the weights (published StableAvatar layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, a few iterations, CPU")
    parser.add_argument("--minutes", type=float, help="hold the whole run to this many minutes of wall clock")
    parser.add_argument("--identities", type=int)
    parser.add_argument("--clip-latents", type=int, help="latent frames of each pool video (4 per video frame)")
    parser.add_argument("--size", type=int, help="frame size of the training videos (small-scale checks)")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--vae-seconds", type=float)
    parser.add_argument("--dit-seconds", type=float)
    parser.add_argument("--audio-steps", type=int)
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--dit-steps", type=int)
    parser.add_argument("--vae-batch", type=int)
    parser.add_argument("--dit-batch", type=int)
    parser.add_argument("--vae-base", type=int, help="VAE base width (Wan 2.1 layout; the loader reads it from the file)")
    parser.add_argument("--vae-kl", type=float)
    parser.add_argument("--vae-still-share", type=float, help="share of the VAE's time on stills before the clips")
    parser.add_argument("--vae-decoder-share", type=float,
                        help="share of a new VAE's time on its decoder side alone, after the whole VAE")
    parser.add_argument("--vae-decoder-lr", type=float)
    parser.add_argument("--stop-after", choices=("vae",),
                        help="end once the VAE is written; the same command without it goes on from there")
    parser.add_argument("--device")
    parser.add_argument("--init", help="continue from this weights folder (VAE decoder and DiT train on)")
    parser.add_argument("--vae-lr", type=float)
    parser.add_argument("--dit-lr", type=float)
    parser.add_argument("--vae-episode-latents", type=int, help="latent frames of each clip streamed through the VAE")
    parser.add_argument("--vae-grad-latents", type=int, help="latent frames of the stream per VAE step")
    parser.add_argument("--export-dtype", choices=("float16", "float32"), help="dtype of the VAE and DiT files")
    args = parser.parse_args()
    config = TrainConfig.tiny() if args.tiny else TrainConfig()
    config = with_overrides(config, seed=args.seed, minutes=args.minutes, identities=args.identities,
                            clip_latents=args.clip_latents, size=args.size,
                            workers=args.workers, vae_seconds=args.vae_seconds, dit_seconds=args.dit_seconds,
                            audio_steps=args.audio_steps, vae_steps=args.vae_steps, dit_steps=args.dit_steps,
                            vae_batch=args.vae_batch, dit_batch=args.dit_batch, vae_kl=args.vae_kl,
                            vae_still_share=args.vae_still_share, vae_decoder_share=args.vae_decoder_share,
                            vae_decoder_lr=args.vae_decoder_lr,
                            device=args.device, init=args.init, vae_lr=args.vae_lr, dit_lr=args.dit_lr,
                            vae_episode_latents=args.vae_episode_latents, vae_grad_latents=args.vae_grad_latents,
                            export_dtype=args.export_dtype)
    if args.vae_base is not None:
        config = replace(config, sizes=replace(config.sizes, vae_base=args.vae_base))
    def log(line: str) -> None:
        print(f"[{time.perf_counter() - STARTED:7.1f} s] {line}", flush=True)

    summary = train(args.out, config, log, started=STARTED, stop_after=args.stop_after)
    if "stopped_after" not in summary:
        verify(args.out)
        log("weights load strictly through avatarcli.loading")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
