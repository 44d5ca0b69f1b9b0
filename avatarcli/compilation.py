"""`--compile auto|on|off`: whether `animate` compiles the DiT blocks, and whether a loaded transformer runs compiled.

Compiling (the q/k/v projections fused, each transformer block torch.compile'd: diffusers' regional compilation) costs
a fixed time at the first forwards of a shape, then makes every window-step faster (about 20% at 480x832 on an H100,
benchmarks/README.md). `auto`, the default, compiles on CUDA when the job's planned window-steps reach the break-even
of its model (the driver's `compile_break_even`); `on` compiles on CUDA; `off` never does. Nothing is
compiled on the CPU. A batch decides once for the jobs that share a model set (avatarcli/batch.py), over their
window-steps together, and keeps the compiled blocks for all of them.

Torch-free: the options and a manifest's validation read it before torch is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any

COMPILE_MODES = ("auto", "on", "off")

# The window-steps (one forward of every guidance branch at 480x832) after which compiling has paid for itself: the
# compile time of the first compiled window-steps over the time each later one saves, with a cold compile cache, as
# benchmarks/bench_compile.py measured it on an H100 (2026-12-06): 14.1 s of compiling against 0.361 s saved per cfg
# window-step (1.937 s eager, 1.576 s compiled) = 39; with a warm cache 5. It is the audio driver's 1.3B DiT's; the
# driving-video driver's 14B one has its own (avatarcli/drivers/flashportrait.py).
BREAK_EVEN_WINDOW_STEPS = 39


def compile_mode(value: Any) -> Any:
    """A compile setting as a mode: true/false (from when it was a flag, e.g. in a manifest) are on/off; anything
    else is returned as it is, for the choice check to name."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


def computed_steps_per_window(preset: Any) -> int:
    """The fewest steps of one window that call the DiT under `preset`: every step, or with step prediction the
    `warmup` steps and one in every `max_predicted + 1` of the rest (the most it can skip; the last step may be
    predicted). `fast` and `live` compute exactly this (3 and 2); on the demo model `balanced` computes 9 per window
    where this gives 8: an estimate on the low side, so `auto` errs towards not compiling."""
    prediction = preset.prediction
    if prediction is None:
        return preset.steps
    warmup = min(prediction.warmup, preset.steps)
    return warmup + (preset.steps - warmup) // (prediction.max_predicted + 1)


def planned_window_steps(driver: Any, job: Any, frames: int) -> int:
    """The window-steps of a job of `frames` video frames that call the DiT, at least: the driver's windows times
    `computed_steps_per_window`."""
    return len(driver.window_plan(job, frames).windows) * computed_steps_per_window(job.preset)


def compiles(mode: str, device: Any, window_steps: int, break_even: int | None = BREAK_EVEN_WINDOW_STEPS) -> bool:
    """Whether a job (or a batch's jobs sharing a model set) of `window_steps` compiles on `device` (its `.type`):
    under `auto` once they reach the model's `break_even` (None: a model no job repays)."""
    if mode == "off" or getattr(device, "type", device) != "cuda":
        return False
    return mode == "on" or (break_even is not None and window_steps >= break_even)


def decided(job: Any, device: Any, window_steps: int, break_even: int | None = BREAK_EVEN_WINDOW_STEPS) -> Any:
    """The job with its compile mode decided, "on" or "off": what a driver loads the models with."""
    on = compiles(job.compile, device, window_steps, break_even)
    return dataclasses.replace(job, compile="on" if on else "off")


def is_compiled(transformer: Any) -> bool:
    """Whether the transformer's blocks run compiled (`nn.Module.compile`, which diffusers' regional compilation calls
    on each block)."""
    blocks = getattr(transformer, "blocks", None) or ()
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)


def compile_blocks(transformer: Any) -> None:
    """Compile each of the transformer's blocks in place (diffusers' regional compilation, full graphs), without
    diffusers' log lines; the drivers and the benchmarks share it."""
    from avatarcli.runtime import quiet_diffusers

    with quiet_diffusers():
        transformer.compile_repeated_blocks(fullgraph=True)
