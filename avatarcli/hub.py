"""Weight download and lookup on the Hugging Face Hub.

Each model is a `ModelSpec`: one Hub repo plus the glob patterns of the files the pipeline reads, so a
download never pulls the parts of a repo we do not use (StableAvatar's repo also holds a 3 GB base DiT
that its `.pt` files supersede, and a vocal separator).

Environment: `HF_HOME` / `HF_HUB_CACHE` (cache location), `HF_ENDPOINT` (mirror) and `HF_HUB_OFFLINE`
are honoured. huggingface_hub reads them once at import, so they are looked up again on every call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from avatarcli.errors import AvatarError, EnvironmentProblem


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model: a Hub repo and the subset of its files the pipeline needs.

    `required_files` must all exist in a usable copy. `required_any` lists groups of which at least
    one file must exist (a weight published in either of two formats). `approx_size_gb` is the size of
    the filtered download, used to warn about disk space.
    """

    repo_id: str
    allow_patterns: tuple[str, ...]
    description: str
    ignore_patterns: tuple[str, ...] = ()
    required_files: tuple[str, ...] = ()
    required_any: tuple[tuple[str, ...], ...] = ()
    revision: str | None = None
    approx_size_gb: float = 0.0
    # A model assembled from several repos: (subfolder, part) pairs; each part is fetched into its subfolder.
    parts: tuple[tuple[str, "ModelSpec"], ...] = ()
    # Files a download fetches beside `allow_patterns` that only some jobs need: a cached copy without them (one
    # fetched before they were added) still counts as complete (resolve_weights' `also` asks for them).
    optional_files: tuple[str, ...] = ()


_WAV2VEC = "wav2vec2-base-960h"
_WAN_BASE = "Wan2.1-Fun-V1.1-1.3B-InP"
_UMT5_TOKENIZER = f"{_WAN_BASE}/google/umt5-xxl"

# Layout of FrancisRing/StableAvatar per its README and wan_civitai.yaml. Left out on purpose:
# the base diffusion_pytorch_model.safetensors (each transformer3d-*.pt is a full transformer state
# dict), Kim_Vocal_2.onnx (optional vocal separation) and xlm-roberta-large/ (the CLIP tokenizer,
# unused because the reference image is never captioned).
STABLEAVATAR = ModelSpec(
    repo_id="FrancisRing/StableAvatar",
    description="StableAvatar 1.3B (square and rec-vec transformers) with its Wan2.1-Fun base parts and wav2vec2",
    allow_patterns=(
        f"{_WAV2VEC}/*",
        f"{_WAN_BASE}/config.json",
        f"{_WAN_BASE}/Wan2.1_VAE.pth",
        f"{_WAN_BASE}/models_t5_umt5-xxl-enc-bf16.pth",
        f"{_WAN_BASE}/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        f"{_UMT5_TOKENIZER}/*",
        "StableAvatar-1.3B/transformer3d-square.pt",
        "StableAvatar-1.3B/transformer3d-rec-vec.pt",
    ),
    # A copy of facebook/wav2vec2-base-960h may also carry TensorFlow / Flax weights we never read.
    ignore_patterns=("*.h5", "*.msgpack", "*.ot"),
    required_files=(
        f"{_WAV2VEC}/config.json",
        f"{_WAV2VEC}/preprocessor_config.json",
        f"{_WAN_BASE}/config.json",
        f"{_WAN_BASE}/Wan2.1_VAE.pth",
        f"{_WAN_BASE}/models_t5_umt5-xxl-enc-bf16.pth",
        f"{_WAN_BASE}/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        f"{_UMT5_TOKENIZER}/tokenizer_config.json",
        "StableAvatar-1.3B/transformer3d-square.pt",
        "StableAvatar-1.3B/transformer3d-rec-vec.pt",
    ),
    required_any=(
        (f"{_WAV2VEC}/model.safetensors", f"{_WAV2VEC}/pytorch_model.bin"),
        (f"{_UMT5_TOKENIZER}/tokenizer.json", f"{_UMT5_TOKENIZER}/spiece.model"),
    ),
    # umT5 11.4 + CLIP 4.7 + two transformers 7.0 + VAE 0.5 + wav2vec2 <1 (digest §2 sizes).
    approx_size_gb=24.0,
)

# FlashPortrait (flashportrait.md §2): FrancisRing/FlashPortrait's transformer.pt, portrait encoder and face files,
# and the files of its 4-step path (the step-distill LoRA and the tiny VAE: fetched with the rest, required only by a
# job that uses them, see resolve_weights' `also`) in FlashPortrait/, and the original-layout Wan2.1-I2V-14B-720P in
# Wan2.1-I2V-14B-720P/ (not its xlm-roberta-large/ CLIP tokenizer: the portrait is never captioned).
_FP_FILES = ("transformer.pt", "portrait_encoder.pt", "pd_fpg.pth", "face_det.onnx", "face_landmark.onnx")
_TINY_VAE_FILE = "fast_vae.pth"  # loading/taehv.py FAST_VAE_FILE (not imported: it imports torch)
FP_TURBO_FILES = ("fast_lora_rank64.safetensors", _TINY_VAE_FILE)
_I2V_FILES = ("config.json", "diffusion_pytorch_model.safetensors.index.json", "Wan2.1_VAE.pth",
              "models_t5_umt5-xxl-enc-bf16.pth", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
              "google/umt5-xxl/tokenizer_config.json",
              *(f"diffusion_pytorch_model-{n:05d}-of-00007.safetensors" for n in range(1, 8)))
FLASHPORTRAIT = ModelSpec(
    repo_id="FrancisRing/FlashPortrait",
    description="FlashPortrait (transformer overlay, portrait encoder, face files) on Wan2.1-I2V-14B-720P",
    allow_patterns=(),
    parts=(
        ("FlashPortrait", ModelSpec(repo_id="FrancisRing/FlashPortrait", allow_patterns=_FP_FILES,
                                    optional_files=FP_TURBO_FILES, required_files=_FP_FILES,
                                    description="FlashPortrait files")),
        ("Wan2.1-I2V-14B-720P", ModelSpec(
            repo_id="Wan-AI/Wan2.1-I2V-14B-720P", description="Wan2.1-I2V-14B-720P, original layout",
            allow_patterns=tuple(f for f in _I2V_FILES if not f.startswith("google/")) + ("google/umt5-xxl/*",),
            required_files=_I2V_FILES,
            required_any=(("google/umt5-xxl/tokenizer.json", "google/umt5-xxl/spiece.model"),))),
    ),
    # Estimate: 16.4B-parameter base DiT in float32 66 + umT5 11.4 + CLIP 4.8 + VAE 0.5 + FlashPortrait files (the
    # rank-64 LoRA of the 14B DiT under 1).
    approx_size_gb=121.0,
)

# The tiny Wan2.1 video decoder (TAEHV "taew2_1") alone, as FlashPortrait publishes it: what `--audio --decoder tiny`
# needs beside the StableAvatar files (the two models share the Wan2.1 latent space).
TAEHV = ModelSpec(repo_id="FrancisRing/FlashPortrait", allow_patterns=(_TINY_VAE_FILE,),
                  required_files=(_TINY_VAE_FILE,), approx_size_gb=0.03,
                  description="the tiny Wan2.1 video decoder (TAEHV) for --decoder tiny")

MODELS: dict[str, ModelSpec] = {"stableavatar": STABLEAVATAR, "flashportrait": FLASHPORTRAIT, "taehv": TAEHV}


def register_model(name: str, spec: ModelSpec) -> None:
    """Add (or replace) a downloadable model under `name`."""
    MODELS[name] = spec


def model_spec(name: str) -> ModelSpec:
    spec = MODELS.get(name)
    if spec is None:
        known = ", ".join(sorted(MODELS)) or "none"
        raise AvatarError(f"unknown model '{name}': known models are {known}")
    return spec


def required_files(name: str) -> list[str]:
    """Relative paths that must all exist in a usable copy of model `name`."""
    spec = model_spec(name)
    if spec.parts:
        return [f"{sub}/{path}" for sub, part in spec.parts for path in part.required_files]
    return list(spec.required_files)


def missing_files(name: str, folder: Path) -> list[str]:
    """What `folder` lacks to be a usable copy of model `name` (empty list when complete)."""
    return _missing(model_spec(name), Path(folder))


def _missing(spec: ModelSpec, folder: Path) -> list[str]:
    if spec.parts:
        return [f"{sub}/{path}" for sub, part in spec.parts for path in _missing(part, folder / sub)]
    missing = _absent(folder, spec.required_files)
    for alternatives in spec.required_any:
        if not any((folder / path).is_file() for path in alternatives):
            missing.append(" or ".join(alternatives))
    return missing


def hub_cache_dir() -> Path:
    """The Hub cache folder as the current environment defines it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub_constants.HF_HUB_CACHE)


def is_offline() -> bool:
    # Read at call time so that a flag patched after import (tests, embedding apps) takes effect.
    return bool(hub_constants.HF_HUB_OFFLINE)


def _endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/")
    return endpoint or None


class _SilentTqdm(tqdm):
    def __init__(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    reason = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _offline_message(name: str) -> str:
    return (
        f"{name} weights are not on this machine and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE and run "
        f"`avatarcli download {name}`, or pass --weights DIR pointing at a downloaded copy"
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x talks through httpx, 2.x through httpx2; their errors are not OSErrors.
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.append(module.HTTPError)
    return tuple(errors)


def _snapshot(spec: ModelSpec, local_dir: Path | None, local_files_only: bool, progress: bool) -> Path:
    patterns = spec.allow_patterns + (() if local_files_only else spec.optional_files)
    folder = huggingface_hub.snapshot_download(
        spec.repo_id,
        revision=spec.revision,
        allow_patterns=list(patterns),
        ignore_patterns=list(spec.ignore_patterns) or None,
        local_dir=local_dir,
        cache_dir=None if local_dir is not None else hub_cache_dir(),
        local_files_only=local_files_only,
        endpoint=_endpoint(),
        tqdm_class=None if progress else _SilentTqdm,
    )
    return Path(folder)


def download(name: str, local_dir: Path | None = None, progress: bool = True) -> Path:
    """Fetch the files of model `name` (resuming partial downloads) and return the folder holding them.

    Without `local_dir` the files go to the Hub cache and the snapshot folder is returned (for a model of several
    repos, a folder in the cache linking each part's snapshot under its subfolder).
    """
    spec = model_spec(name)
    if spec.parts:
        folders = {sub: _download_spec(name, part, None if local_dir is None else Path(local_dir) / sub, progress)
                   for sub, part in spec.parts}
        return Path(local_dir) if local_dir is not None else _assemble(name, folders)
    return _download_spec(name, spec, local_dir, progress)


def _assemble(name: str, folders: dict[str, Path]) -> Path:
    """A folder in the Hub cache whose subfolders link the parts' snapshot folders."""
    folder = hub_cache_dir() / "avatarcli-models" / name
    folder.mkdir(parents=True, exist_ok=True)
    for sub, target in folders.items():
        link = folder / sub
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return folder


def _download_spec(name: str, spec: ModelSpec, local_dir: Path | None, progress: bool) -> Path:
    try:
        folder = _snapshot(spec, local_dir, local_files_only=False, progress=progress)
    except RevisionNotFoundError as error:
        raise EnvironmentProblem(f"revision {spec.revision} of {spec.repo_id} does not exist on the Hub: {_one_line(error)}")
    except RepositoryNotFoundError:
        raise EnvironmentProblem(
            f"Hub repo {spec.repo_id} was not found at {_endpoint() or hub_constants.ENDPOINT} or is not "
            f"accessible: check HF_ENDPOINT, or log in with `hf auth login` if the repo is gated"
        )
    except LocalEntryNotFoundError as error:
        if is_offline():
            raise EnvironmentProblem(_offline_message(name))
        # huggingface_hub wraps the transport error in a long paragraph; its cause is the useful part.
        reason = _one_line(error.__cause__ or error)
        raise EnvironmentProblem(
            f"could not download {name} from {spec.repo_id} ({reason}); check the network or "
            f"HF_ENDPOINT and rerun `avatarcli download {name}` (it resumes), or pass --weights DIR"
        )
    except HfHubHTTPError as error:
        raise EnvironmentProblem(f"the Hub refused the download of {spec.repo_id}: {_one_line(error)}")
    except _transport_errors() as error:
        raise EnvironmentProblem(
            f"download of {name} failed ({_one_line(error)}); rerun `avatarcli download {name}` to resume"
        )
    missing = _missing(spec, folder)
    if missing:
        raise EnvironmentProblem(
            f"{spec.repo_id} no longer provides {missing[0]}; the repo layout changed, pass --weights DIR "
            f"with a complete copy"
        )
    return folder


def cached_weights(name: str) -> Path | None:
    """The complete cached copy of model `name`, or None. Makes no network request."""
    spec = model_spec(name)
    if spec.parts:
        folders = {}
        for sub, part in spec.parts:
            try:
                folders[sub] = _snapshot(part, None, local_files_only=True, progress=False)
            except (LocalEntryNotFoundError, OSError):
                return None
            if _missing(part, folders[sub]):
                return None
        return _assemble(name, folders)
    try:
        folder = _snapshot(spec, None, local_files_only=True, progress=False)
    except (LocalEntryNotFoundError, OSError):
        return None
    return folder if not missing_files(name, folder) else None


def check_weights_dir(weights_dir: Path) -> Path:
    """A --weights path that is a folder (expanded), else an AvatarError for a file (exit 2: the command names the
    wrong thing) or an EnvironmentProblem for a missing folder (exit 3)."""
    weights_dir = Path(weights_dir).expanduser()
    if weights_dir.is_dir():
        return weights_dir
    if weights_dir.exists():
        raise AvatarError(f"--weights {weights_dir} is a file; it takes the folder that holds the model's files "
                          "(e.g. the one `avatarcli download --dir` filled)")
    raise EnvironmentProblem(f"--weights folder {weights_dir} does not exist: check the path, or drop --weights to "
                             "use (and fill) the Hub cache")


def resolve_weights(name: str, weights_dir: Path | None, allow_download: bool, also: tuple[str, ...] = ()) -> Path:
    """The folder to load model `name` from.

    A user-given `weights_dir` is used as is and must be complete. Otherwise the Hub cache is used,
    and if it lacks files the model is downloaded when `allow_download` is set and the Hub is online.
    `also`: files beyond the required ones that this job needs (relative paths the model's download fetches, e.g.
    FlashPortrait's 4-step LoRA); a cached copy without them is completed like one missing a required file.
    """
    if weights_dir is not None:
        weights_dir = check_weights_dir(weights_dir)
        missing = missing_files(name, weights_dir) + _absent(weights_dir, also)
        if missing:
            raise EnvironmentProblem(
                f"--weights folder {weights_dir} lacks {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f": copy the missing files there, or drop --weights and run `avatarcli download {name}`"
            )
        return weights_dir

    folder = cached_weights(name)
    if folder is not None and not _absent(folder, also):
        return folder
    if is_offline():
        raise EnvironmentProblem(_offline_message(name))
    if not allow_download:
        raise EnvironmentProblem(
            f"{name} weights are not downloaded: run `avatarcli download {name}`, or pass --weights DIR"
        )
    folder = download(name)
    absent = _absent(folder, also)
    if absent:
        raise EnvironmentProblem(f"the download of {name} lacks {absent[0]}: its Hub repo no longer provides it; pass "
                                 "--weights DIR with a copy that has it")
    return folder


def _absent(folder: Path, paths: tuple[str, ...]) -> list[str]:
    return [path for path in paths if not (folder / path).is_file()]


def _register_sfd_models() -> None:
    """`sfd-xl`, `sfd-xxl` (denoiser + AutoGuidance model + latent statistics) and `sfd-vae` (texture VAE)."""
    from avatarcli.loading.sfd_files import SFD_DOWNLOADS

    for name, (repo_id, files) in SFD_DOWNLOADS.items():
        files = tuple(str(f) for f in files)
        register_model(name, ModelSpec(repo_id=repo_id, allow_patterns=files, required_files=files,
                                       description=f"SFD files for `avatarcli sfd` ({name})"))


_register_sfd_models()
