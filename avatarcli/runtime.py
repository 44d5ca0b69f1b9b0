"""Device, dtype and timing helpers shared by the pipeline and the drivers."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from avatarcli.errors import AvatarError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise AvatarError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AvatarError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "fp32": torch.float32, "float32": torch.float32}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise AvatarError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return choices[dtype]


@contextmanager
def quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


class StageClock:
    """Wall time per stage; synchronises CUDA so asynchronous kernels are charged to the right stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[stage] = self.totals.get(stage, 0.0) + time.perf_counter() - start

    def sync(self):
        # The calling thread's stream only: a decode running on another stream (decode/overlap.py) is not charged
        # to this stage, and this thread does not wait for it.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
