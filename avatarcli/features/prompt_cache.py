"""Prompt embeddings cached on disk, so a cached prompt needs no umT5-XXL (11 GB in bf16) at all.

An entry is keyed by the two prompts (negative, positive), the text encoder file's SHA-256 and the embedding dtype;
it holds the [2, text_len, dim] tensor `encode_prompts` returned. The file hash is computed once per (path, size,
modification time) and remembered in `file-hashes.json`. Entries are written to a temp file and renamed. The cache
lives in $AVATARCLI_CACHE_DIR/prompts (default: $XDG_CACHE_HOME/avatarcli, else ~/.cache/avatarcli);
AVATARCLI_PROMPT_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

HASH_CHUNK = 1 << 24


def cache_dir() -> Path:
    root = os.environ.get("AVATARCLI_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "avatarcli"


def enabled() -> bool:
    return os.environ.get("AVATARCLI_PROMPT_CACHE", "1") not in ("0", "false", "no", "off")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path, folder: Path) -> str:
    """SHA-256 of a (large) file, remembered per (resolved path, size, mtime) in `folder`/file-hashes.json."""
    path = Path(path).resolve()
    stat = path.stat()
    index_path = folder / "file-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    try:
        _atomic_write(index_path, lambda temp: Path(temp).write_text(json.dumps(index, indent=1)))
    except OSError:
        pass  # a read-only cache still works, it only hashes again next time
    return digest.hexdigest()


class PromptCache:
    """Embeddings of prompt pairs for one text encoder file and dtype."""

    def __init__(self, encoder_file: Path | None, dtype: torch.dtype, folder: Path | None = None):
        self.folder = (folder or cache_dir()) / "prompts"
        self.dtype = dtype
        self.active = enabled() and encoder_file is not None and Path(encoder_file).is_file()
        self._encoder = file_sha256(encoder_file, self.folder) if self.active else ""

    def path(self, prompts: tuple[str, ...]) -> Path:
        key = json.dumps({"prompts": list(prompts), "encoder_sha256": self._encoder, "dtype": str(self.dtype)})
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.pt"

    def get(self, prompts: tuple[str, ...]) -> torch.Tensor | None:
        if not self.active:
            return None
        try:
            entry = torch.load(self.path(prompts), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            return None  # absent or unreadable: encode again
        if not isinstance(entry, dict) or entry.get("prompts") != list(prompts):
            return None
        embeddings = entry.get("embeddings")
        return embeddings if isinstance(embeddings, torch.Tensor) and embeddings.dtype == self.dtype else None

    def put(self, prompts: tuple[str, ...], embeddings: torch.Tensor) -> None:
        if not self.active:
            return
        entry = {"prompts": list(prompts), "embeddings": embeddings.detach().to("cpu", self.dtype).contiguous()}
        try:
            _atomic_write(self.path(prompts), lambda temp: torch.save(entry, temp))
        except OSError:
            pass  # a full or read-only cache disk must not fail the video


def encoder_file(path: Path) -> Path | None:
    """The text encoder file as it exists on disk (`.pth`, or a `.safetensors` of the same name), else None."""
    path = Path(path)
    for candidate in (path, path.with_suffix(".safetensors")):
        if candidate.is_file():
            return candidate
    return None


def prompt_embeddings(models, prompts: tuple[str, str], on_disk: PromptCache | None,
                      weights: Callable[[], Path], t5_file: str, tokenizer_folder: str, device: torch.device,
                      keep_encoder: bool, offload: str = "none") -> torch.Tensor:
    """The [2, text_len, dim] embeddings of (negative, positive) prompts, for either driver.

    Looked up in `models.prompt_cache` (this process), then on disk; only on a miss is umT5 loaded (when it is not
    loaded already) from `weights() / t5_file` and run (`weights` is only asked then). Unless `keep_encoder`, umT5 is
    freed afterwards (11 GB in bf16) before the DiT runs. `models` holds `prompt_cache`, `text_encoder` and `tokenizer`.
    A umT5 loaded here runs offloaded with `offload` (the job's --offload) or where it does not fit the GPU memory left
    (loading/memory.py `place_text_encoder`).
    """
    from avatarcli.features.text import encode_prompts

    if prompts not in models.prompt_cache:
        embeddings = on_disk.get(prompts) if on_disk is not None else None
        if embeddings is None:
            if models.text_encoder is None:  # not loaded (cached prompts) or freed: load it now
                from avatarcli.loading.components import load_text_encoder
                from avatarcli.loading.memory import place_text_encoder
                from avatarcli.loading.stableavatar import text_dtype_for

                folder = weights()
                models.text_encoder, models.tokenizer = load_text_encoder(
                    folder / t5_file, folder / tokenizer_folder, device="cpu", dtype=text_dtype_for(device))
                place_text_encoder(models.text_encoder, device, offload)
            embeddings = encode_prompts(models.text_encoder, models.tokenizer, list(prompts), device=device)
            if on_disk is not None:
                on_disk.put(prompts, embeddings)
        models.prompt_cache[prompts] = embeddings.to(device)
    if not keep_encoder:
        models.text_encoder = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return models.prompt_cache[prompts]
