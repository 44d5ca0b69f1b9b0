"""ONNX Runtime sessions for the face networks: CUDA when asked for and available, else CPU."""

from __future__ import annotations

from pathlib import Path

from avatarcli.errors import CheckpointError


def providers_for(device: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: str | Path, device: str = "cpu", threads: int | None = None):
    """An InferenceSession for `path`; a missing or unreadable model is a one-line error naming the file."""
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"face model not found: {path}; run `avatarcli download flashportrait` or pass the folder holding it")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers_for(device))
    except Exception as error:  # onnxruntime raises its own exception types for corrupt or foreign files
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"cannot load ONNX model {path} ({reason}); download it again") from error
