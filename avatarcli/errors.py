"""Exception types, one per exit status of the CLI.

- `AvatarError`: bad input or usage the user can fix by changing the command (exit 2).
- `EnvironmentProblem` (an AvatarError): a retry or a set-up step fixes it, not a different command: no network,
  offline without the weights, missing or corrupt weight files, no ffmpeg, out of memory, disk full (exit 3).
- `Interrupted`: the user stopped the job (Ctrl-C); nothing was written (exit 130).

Anything else that escapes is a bug (exit 1). This module imports nothing heavy, so the CLI can use it at start-up.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERRUPTED = 130


class AvatarError(Exception):
    """A user-fixable problem. The message says what is wrong and what to do."""

    exit_code = EXIT_USAGE


class EnvironmentProblem(AvatarError):
    """The command is right but the machine is not ready: network, weights, ffmpeg, memory, disk."""

    exit_code = EXIT_ENVIRONMENT


class CheckpointError(EnvironmentProblem):
    """A weight file does not match the model it is loaded into (missing/unexpected/mis-shaped keys, unreadable)."""


class Interrupted(Exception):
    """The job was stopped by SIGINT / Ctrl-C after cleaning up; the message says what was (not) written."""

    exit_code = EXIT_INTERRUPTED


def exit_code_for(error: BaseException) -> int:
    """The CLI exit status for an exception (see the module docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(error, "exit_code", None)
    if isinstance(error, (AvatarError, Interrupted)) and isinstance(code, int):
        return code
    return EXIT_ENVIRONMENT if as_environment_problem(error) is not None else EXIT_BUG


def as_environment_problem(error: BaseException) -> EnvironmentProblem | None:
    """An EnvironmentProblem saying what to do for out-of-memory and disk-full errors from torch or the OS, else None.

    Recognised by type name and message, so neither torch nor CUDA has to be imported to classify an error.
    """
    if isinstance(error, EnvironmentProblem):
        return error
    if isinstance(error, OSError) and is_disk_full(error):
        return no_space_left(error.filename)
    text = str(error)
    if type(error).__name__ == "OutOfMemoryError" or "CUDA out of memory" in text:
        return EnvironmentProblem(
            "the GPU ran out of memory: close other GPU programs, or use a smaller --size, --dtype bf16, "
            "or --device cpu")
    if isinstance(error, MemoryError):
        return EnvironmentProblem("the machine ran out of memory: close other programs or use a smaller --size")
    package = REQUIRED_IMPORTS.get((getattr(error, "name", None) or "").split(".")[0])
    if isinstance(error, ModuleNotFoundError) and package:
        if "." not in error.name:
            return EnvironmentProblem(f"the required package {package} is not installed (no module {error.name}): "
                                      f"reinstall avatarcli, or pip install {package}")
        return EnvironmentProblem(  # the package is there, at a version without this module
            f"the installed {package} has no module {error.name}: install the version avatarcli requires "
            f"(pip install --upgrade avatarcli, or see pyproject.toml)")
    return None


def is_disk_full(error: BaseException | str) -> bool:
    """An OSError for a full disk (or quota), or ffmpeg's text for one."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def no_space_left(output=None) -> EnvironmentProblem:
    """The one line for a full disk, naming the file the user asked for (not a temp or segment file)."""
    where = f" writing {output}" if output else ""
    return EnvironmentProblem(f"no space left on device{where} (the disk is full): free some space, or write "
                              "elsewhere with -o, and rerun")


# Import name -> distribution of each of pyproject.toml's runtime dependencies: an install that lost one of them is
# an environment problem (exit 3), not a bug.
REQUIRED_IMPORTS = {
    "torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "huggingface_hub": "huggingface_hub",
    "safetensors": "safetensors", "accelerate": "accelerate", "numpy": "numpy", "PIL": "pillow",
    "imageio_ffmpeg": "imageio-ffmpeg", "typer": "typer", "rich": "rich", "yaml": "pyyaml", "ftfy": "ftfy",
    "sentencepiece": "sentencepiece", "tokenizers": "tokenizers", "onnxruntime": "onnxruntime", "onnx": "onnx",
    "cv2": "opencv-python-headless",
}
