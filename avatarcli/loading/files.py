"""Reading weight files: the one place a checkpoint is opened.

Safetensors through safetensors; pickles (.pt, .pth, .ckpt) only through torch.load(weights_only=True), memory-mapped
where the file format allows it. A missing file is an EnvironmentProblem; an unreadable one a CheckpointError.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from avatarcli.errors import CheckpointError, EnvironmentProblem


def read_checkpoint(path: str | Path) -> Mapping[str, object]:
    """The file's top-level mapping (a state dict, or a dict holding one under e.g. 'ema' or 'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise EnvironmentProblem(f"weight file not found: {path}; download the model files (avatarcli download)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped; read them into memory instead.
            if "mmap can only be used" not in str(error):
                raise
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download, or not a weights-only checkpoint at all
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(f"cannot read {path} as a weights-only checkpoint ({reason}); download it again") \
            from error
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict; is it the right file?")
    return state


def read_state_dict(path: str | Path, entry: str | None = None) -> dict[str, torch.Tensor]:
    """A plain state dict of tensors, unwrapped from `entry` when the file nests it there."""
    state = read_checkpoint(path)
    if entry is not None and isinstance(state.get(entry), Mapping):
        state = state[entry]
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors; is it the right file?")
    return dict(state)


def listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """0 missing, 0 unexpected, equal shapes; otherwise a CheckpointError naming the file and the keys."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
    if reshaped:
        problems.append("shape mismatch: " + listing(
            [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in reshaped]))
    if problems:
        raise CheckpointError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems))
