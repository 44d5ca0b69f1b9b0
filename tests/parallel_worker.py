"""Run under `python -m torch.distributed.run --nproc-per-node N tests/parallel_worker.py RESULT.json [JOBS.json]`
(gloo, CPU). One launch does all of a world size's checks, since starting processes is the slow part:

* the window-parallel sampler against the one-process joint loop on several window plans, with and without step
  prediction: rank 0 writes {case: true/false} (exactly equal latents) under "sampler";
* context parallelism (Ulysses through diffusers) of one tiny StableAvatar forward against the same forward in one
  process, under "ulysses": the largest difference, the output's scale, and the tokens each rank's blocks saw;
* then every command line of JOBS.json ({"jobs": [[arg, ...], ...], "driving_window": N}) through the CLI's
  `main`, as `torchrun -m avatarcli` runs it: under "jobs", every rank's exit code and rank 0's stdout.
  `driving_window` shrinks the driving-video driver's 51-latent-frame windows, so that a short driving clip
  makes several windows (the test's one-process reference does the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import torch

from avatarcli.parallel.group import ProcessGroup, leave
from avatarcli.sampling.predict import Prediction
from avatarcli.sampling.sampler import sample_joint, sample_window_parallel
from avatarcli.sampling.schedule import flow_sigmas
from avatarcli.sampling.windows import plan_windows

SHAPE = (4, 3, 5)  # channels, height, width of one latent frame

# name: (latent frames, window, overlap, steps, prediction)
CASES = {
    "1 window": (9, 9, 3, 4, False),
    "2 windows": (14, 9, 3, 4, False),
    "7 windows": (39, 9, 4, 4, False),
    "7 windows, overlap above half a window": (21, 9, 7, 3, False),
    "7 windows, step prediction": (39, 9, 4, 8, True),
}


def noise(start: int, end: int) -> torch.Tensor:
    return torch.cat([torch.randn(1, SHAPE[0], 1, SHAPE[1], SHAPE[2], generator=torch.Generator().manual_seed(f))
                      for f in range(start, end)], dim=2)


def denoise(window, step: int, latents: torch.Tensor) -> torch.Tensor:
    """Nonlinear in the latents and different per window and step, so any misrouted frame changes the result."""
    frames = torch.arange(latents.shape[2], dtype=latents.dtype).view(1, 1, -1, 1, 1)
    return torch.sin(1.7 * latents) + 0.3 * latents + 0.05 * window.index - 0.02 * step + 0.01 * frames


def ulysses() -> dict:
    """One forward of a tiny StableAvatar transformer (3 guidance branches, 4 latent frames, per-frame audio), then
    the same forward split over the launch's processes."""
    from avatarcli.loading.transformer import build_transformer
    from avatarcli.models.stableavatar import AudioConditioning
    from avatarcli.parallel.context import enable_context_parallel
    from avatarcli.testing import TINY_STABLEAVATAR
    from avatarcli.testing.stableavatar import random_state_dict, wan_config

    # diffusers picks each process's device as rank % accelerator count, which is 0 on a machine without GPUs
    # (avatarcli refuses --context-parallel on the CPU for that reason); a test-only stand-in lets gloo run it.
    torch.accelerator.device_count = lambda: 1
    group = ProcessGroup(torch.device("cpu"), context=int(os.environ["WORLD_SIZE"]))
    model = build_transformer(random_state_dict(TINY_STABLEAVATAR, 0, "cpu", torch.float32),
                              wan_config(TINY_STABLEAVATAR), dtype=torch.float32, device=torch.device("cpu"))
    g, cfg = torch.Generator().manual_seed(0), model.config
    inputs = (torch.randn(3, cfg.in_channels, 4, 8, 8, generator=g), torch.full((3,), 900.0),
              torch.randn(3, 7, cfg.text_dim, generator=g), torch.randn(3, 257, cfg.image_dim, generator=g),
              AudioConditioning(torch.randn(1, 17, cfg.audio_in_dim, generator=g), [None, 0, 0]))
    tokens = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: tokens.append(args[0].shape[1]))
    with torch.no_grad():
        one = model(*inputs)
        enable_context_parallel(model, group.context, group.context_mesh)
        split = model(*inputs)
    return {"max_abs": (split - one).abs().max().item(), "scale": one.abs().max().item(), "tokens": tokens,
            "shape_equal": split.shape == one.shape}


def main() -> None:
    group = ProcessGroup(torch.device("cpu"))
    results = {}
    for name, (frames, window, overlap, steps, predict) in CASES.items():
        plan = plan_windows(frames, window, overlap, "log")
        sigmas = flow_sigmas(steps, 5.0)
        predictor = Prediction(order=2, max_predicted=2, tolerance=1e3) if predict else None
        chunks = list(sample_window_parallel(plan, sigmas, noise, denoise, group, predictor=predictor))
        if group.rank == 0:
            reference = sample_joint(plan, sigmas, noise(0, plan.latent_frames), denoise, predictor=predictor)
            ordered = [c.start for c in chunks] == sorted(c.start for c in chunks)
            results[name] = ordered and torch.equal(torch.cat([c.latents for c in chunks], dim=2), reference)
            results[name + ": windows"] = len(plan.windows)
        elif chunks:
            results[name] = False  # only rank 0 yields frames
    report = {"sampler": results, "ulysses": ulysses(), "jobs": []}
    spec = json.loads(open(sys.argv[2]).read()) if len(sys.argv) > 2 else {"jobs": []}
    if spec.get("driving_window"):
        import avatarcli.drivers.flashportrait as driving

        driving.WINDOW_LATENT_FRAMES = spec["driving_window"]
    from avatarcli.cli import main as cli

    for args in spec["jobs"]:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli(args)
        codes = group.gather_counts(code)
        report["jobs"].append({"codes": codes, "stdout": stdout.getvalue()})
    if group.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f)
    leave()


if __name__ == "__main__":
    main()
