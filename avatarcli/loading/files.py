"""Reading weight files: the one place a checkpoint is opened.

Safetensors through safetensors; pickles (.pt, .pth, .ckpt) only through torch.load(weights_only=True), memory-mapped
where the file format allows it. A missing file is an EnvironmentProblem; an unreadable one a CheckpointError.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from avatarcli.errors import CheckpointError, EnvironmentProblem


# Pickles with non-tensor objects beside the weights. Some published files keep them (SFD's training script saves an
# OmegaConf config next to `ema`; PD-FGC's `pd_fpg.pth` was only ever loaded unrestricted), and weights_only refuses
# their classes. Such a file is read again with each foreign class mapped, through torch's safe-globals allowlist, to
# an inert placeholder of ours that records its arguments and state and does nothing else: the tensors come out and
# no code from the file runs. Names that are functions rather than classes, or that live in modules able to run
# commands or code (os, subprocess, builtins, ...), are never mapped: such a file is refused with one line naming it.

# Top-level modules whose names in a pickle mean "run something": never stood in for, whatever the name looks like.
_REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "importlib", "runpy", "pty",
    "socket", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "types", "functools", "operator",
    "webbrowser", "io", "_io", "pathlib", "tempfile", "multiprocessing", "threading", "signal", "platform",
    "inspect", "pydoc", "pdb", "timeit", "cProfile", "profile", "asyncio", "urllib", "http", "ftplib", "smtplib",
    "telnetlib", "glob", "zipimport", "pkgutil", "site", "sysconfig", "torch", "dill", "cloudpickle",
})
# Lower-case names that only rebuild data (numpy arrays and scalars inside a saved config): read as placeholders too.
_DATA_REBUILDERS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar", "numpy.dtype", "numpy.ndarray", "_codecs.encode",
})


class InertObject:
    """Stands in for a foreign class found in a checkpoint: keeps what the pickle passed, executes nothing."""

    original_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.original_name}>"


def _stands_in_for(name: str) -> bool:
    """Whether a pickled global may be read as an InertObject: a class (CapWords) outside the refused modules."""
    if name in _DATA_REBUILDERS:
        return True
    module, _, attribute = name.rpartition(".")
    if not module or module.split(".")[0] in _REFUSED_MODULES:
        return False
    return attribute[:1].isupper() and attribute.replace("_", "").isalnum()


def _placeholders(path: Path) -> list[tuple[type, str]]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint (legacy format) or unreadable: nothing to map
        return []
    refused = [name for name in names if not _stands_in_for(name)]
    if refused:
        raise CheckpointError(
            f"refusing to read {path}: it references {', '.join(sorted(refused)[:4])}, which is not "
            "weights data and could run code; use a copy from the official source")
    return [(type(f"Inert_{name.replace('.', '_')}", (InertObject,), {"original_name": name}), name)
            for name in names]


def _load_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        # Files in torch's legacy (pre-zip) format cannot be memory-mapped; read them into memory instead.
        if "mmap can only be used" not in str(error):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> Mapping[str, object]:
    """The file's top-level mapping (a state dict, or a dict holding one under e.g. 'ema' or 'state_dict')."""
    path = Path(path)
    if not path.is_file() and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")  # the same keys in a safetensors container (the embedded demo model)
    if not path.is_file():
        raise EnvironmentProblem(f"weight file not found: {path}; download the model files (avatarcli download)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        try:
            state = _load_pickle(path)
        except pickle.UnpicklingError:
            placeholders = _placeholders(path)
            if not placeholders:
                raise
            with torch.serialization.safe_globals(placeholders):
                state = _load_pickle(path)
    except CheckpointError:
        raise
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
