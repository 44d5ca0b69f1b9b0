"""Several processes (one per GPU) on one video.

* `schedule.py`: window parallelism as data: the wavefront tick of every window-step, the rank that runs each
  window, and the overlap latents that cross between ranks after each tick (no torch.distributed).
* `group.py`: the process group of a `torchrun` launch and the few collective operations the sampler needs.
* `launch.py`: `avatarcli animate --gpus N` starting N copies of itself under torch's elastic launcher.
* `context.py`: context parallelism (Ulysses) of one transformer forward through diffusers' ContextParallelConfig.

The sampler that uses them is `avatarcli.sampling.sampler.sample_window_parallel`.
This module imports nothing heavy: the CLI asks it about the launch before torch is imported.
"""

from __future__ import annotations

import os


def world_size() -> int:
    """Processes of this launch (torchrun sets WORLD_SIZE); 1 outside one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank in the launch (torchrun sets RANK); 0 outside one."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))
