"""Every `animate` option, declared once, and the one place that turns option values into a checked `AnimateJob`.

`OPTIONS` gives each option's name, the type a manifest value must have, what it sets (a job field, a preset
setting, a step-prediction knob) and its help text. The CLI (`avatarcli animate`) takes its help texts from here and
hands its values to `build_job`; batch manifests (avatarcli/batch.py) check their keys and types against `OPTIONS`
and call the same `build_job`; the README's manifest table is `manifest_table()`. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avatarcli.compilation import COMPILE_MODES, compile_mode
from avatarcli.errors import AvatarError
from avatarcli.job import DRIVING_INPUTS, OVERLAP_DECODE_MODES, AnimateJob
from avatarcli.limits import MAX_AUDIO_SECONDS, MAX_DRIVING_FRAMES, MAX_PORTRAIT_PIXELS, check_frame_size, size_help
from avatarcli.presets import NUMERICS_MODES

OFFLOAD_MODES = ("none", "model", "group", "sequential")
PRECISIONS = ("auto", "fp8")
WEIGHTS_DTYPES = ("auto", "fp8")


@dataclass(frozen=True)
class Option:
    name: str  # long name, underscored (the CLI flag has dashes)
    kind: type | tuple[type, ...]  # what a manifest value must be
    sets: str  # "input" (a path), "job" (an AnimateJob field), "preset" (a preset setting), "prediction"
    help: str
    choices: tuple[str, ...] = ()


def _opt(name, kind, sets, help, choices=()) -> Option:  # noqa: A002 - the field is named help
    return Option(name, kind, sets, help, tuple(choices))


NUMBER = (int, float)
OPTIONS: dict[str, Option] = {o.name: o for o in [
    _opt("portrait", str, "input", f"Portrait image (any format Pillow reads; at most "
                                   f"{MAX_PORTRAIT_PIXELS // 1_000_000} megapixels)."),
    _opt("audio", str, "input", "Speech (audio driver): wav, mp3, m4a, flac, ogg or a video's audio track; at most "
                                f"{MAX_AUDIO_SECONDS} s."),
    _opt("driving", str, "input", "Driving face video (driving-video driver): expressions and head motion; at most "
                                  f"{MAX_DRIVING_FRAMES:,} frames."),
    _opt("output", str, "input", "Output mp4 [default: PORTRAIT name + .mp4; in a manifest PORTRAIT_SIGNAL.mp4]; a "
                                 "name without .mp4 gets it added, another video suffix (.mov, .mkv...) is refused."),
    _opt("weights", str, "input", "Folder with the model's published files (else the HF cache)."),
    _opt("preset", str, "job", "Preset name or YAML path (see `avatarcli presets`)."),
    _opt("prompt", str, "job", "Text prompt [default: 'The protagonist is talking.']."),
    _opt("seed", int, "preset", "Random seed [default: preset's, else 42]."),
    _opt("size", str, "preset", size_help()),
    _opt("fps", int, "preset", "Frames per second [default: 25; a --driving video's own]."),
    _opt("steps", int, "preset", "Denoising steps."),
    _opt("guidance", str, "preset", "--audio: cfg (text/audio CFG) or ang (Audio Native Guidance); "
                                    "--driving: expression (expression CFG)."),
    _opt("emo_scale", NUMBER, "preset", "--driving: expression CFG scale [preset: 4]."),
    _opt("text_scale", NUMBER, "preset", "Text CFG scale [preset]."),
    _opt("audio_scale", NUMBER, "preset", "--audio with cfg guidance: audio CFG scale [preset]."),
    _opt("overlap", int, "preset", "Latent frames shared by neighbouring windows."),
    _opt("blend", str, "preset", "Overlap blend weights: log, uniform or linear."),
    _opt("checkpoint", str, "preset", "auto, square or rec-vec."),
    _opt("decoder", str, "preset", "full (Wan VAE) or tiny (TAEHV fast_vae.pth: several times faster, less exact; "
                                   "--audio fetches it as `avatarcli download taehv`) [preset]."),
    _opt("offload", str, "job", "none, model, group or sequential CPU offload of the DiT (and umT5) for small GPUs.",
         OFFLOAD_MODES),
    _opt("weights_dtype", str, "job", "--driving: auto or fp8 (fp8 weight storage, bf16 compute).", WEIGHTS_DTYPES),
    _opt("device", str, "job", "auto, cpu, cuda or cuda:N."),
    _opt("dtype", str, "job", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
    _opt("vae_dtype", str, "job", "VAE decode precision: auto (bf16 on GPU), bf16, fp32."),
    _opt("crf", int, "job", "H.264 quality (lower is better, 0-51); 0 is lossless, which H.264 has only in its High "
                            "4:4:4 Predictive profile (colour stays 4:2:0): many players cannot play it."),
    _opt("overlap_decode", str, "job", "Decode finished frames while the DiT continues: auto (on a GPU), on, off.",
         OVERLAP_DECODE_MODES),
    _opt("precision", str, "job", "--audio: auto (--dtype) or fp8 (fp8 linear layers and self-attention; GPU of "
                                  "compute capability 8.9+, torchao, nvidia-cudnn-frontend).", PRECISIONS),
    _opt("numerics", str, "preset", "DiT numerics: reference (modulation, norms, residual adds and RoPE in float32, "
                                    "as the published code) or fast (all in the --dtype) [preset: reference].",
         NUMERICS_MODES),
    _opt("compile", (str, bool), "job", "Compile the DiT blocks (GPU: a fixed time once, then ~20% faster per step): "
                                        "auto (on a GPU when the job is long enough to repay it), on or off; "
                                        "--compile alone (true in a manifest) is on.", COMPILE_MODES),
    _opt("no_audio", bool, "job", "Write a silent video (no audio track muxed in)."),
    _opt("predict", bool, "prediction", "Step prediction on/off [default: preset]."),
    _opt("predict_order", int, "prediction", "Prediction: extrapolation order, 1-3."),
    _opt("predict_max", int, "prediction", "Prediction: at most K predicted steps in a row."),
    _opt("predict_tolerance", NUMBER, "prediction", "Prediction: relative latent error budget per jump."),
    _opt("predict_layer_ratio", NUMBER, "prediction", "Prediction: layer-signal growth limit (0: off)."),
    _opt("model", str, "job", "stableavatar, or demo: the small embedded model trained on the synthetic world (no "
                              "download; 128x128 unless --size).", ("stableavatar", "demo")),
    _opt("context_parallel", int, "job", "GPUs that split each transformer forward (Ulysses); must divide --gpus; "
                                         "the rest split the windows."),
]}
HELP = {name: option.help for name, option in OPTIONS.items()}
PRESET_OVERRIDES = tuple(name for name, o in OPTIONS.items() if o.sets == "preset")
PREDICTION_KNOBS = {"predict_order": "order", "predict_max": "max_predicted", "predict_tolerance": "tolerance",
                    "predict_layer_ratio": "layer_ratio"}


def cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def manifest_name(name: str) -> str:
    return f"'{name}'"


def build_job(values: dict[str, Any], *, base: Path | None = None, resume: bool = False, processes: int = 1,
              name: Callable[[str], str] = cli_name) -> AnimateJob:
    """A checked AnimateJob from option values (None or absent: not given). `base`: the folder relative paths and
    preset files are resolved against (a manifest's); `processes`: how many processes will share the job; `name`
    spells an option in messages (`--crf` for the CLI, `'crf'` for a manifest). Raises AvatarError (exit 2)."""
    given = {key: value for key, value in values.items() if value is not None}
    if "compile" in given:
        given["compile"] = compile_mode(given["compile"])
    check_choices(given, name)
    paths = {key: _path(given.get(key), base) for key in ("portrait", "audio", "driving", "output", "weights")}
    if paths["portrait"] is None:
        raise AvatarError(f"{name('portrait')} is missing")
    preset = _preset(given, paths, base, name)
    job = AnimateJob(portrait=paths["portrait"], audio=paths["audio"], driving=paths["driving"],
                     output=mp4_name(paths["output"] or Path(paths["portrait"].stem + ".mp4"), name), preset=preset,
                     seed=preset.seed if preset.seed is not None else 42, weights=paths["weights"], resume=resume,
                     mux_audio=not given.get("no_audio", False),
                     **{key: given[key] for key in JOB_FIELDS if key in given})
    check_job(job, processes, name)
    return job


JOB_FIELDS = ("prompt", "device", "dtype", "crf", "vae_dtype", "compile", "offload", "weights_dtype", "model",
              "context_parallel", "overlap_decode", "precision")


# Suffixes of other formats: such an output name is refused rather than written as MP4 under a misleading name.
OTHER_MEDIA = (".mov", ".mkv", ".avi", ".webm", ".gif", ".m4v", ".wmv", ".flv", ".mpg", ".mpeg", ".ts", ".3gp",
               ".ogv", ".png", ".jpg", ".jpeg", ".wav", ".mp3", ".m4a", ".aac", ".flac")


def mp4_name(path: Path, name: Callable[[str], str] = cli_name) -> Path:
    """The output name as written (an H.264 + AAC MP4): `.mp4` added to a name without it (`take` -> `take.mp4`,
    `take.2` -> `take.2.mp4`); another media suffix (`.mov`, `.mkv`...) is an AvatarError. A folder is kept as is
    (the sink's check names it)."""
    suffix = path.suffix.lower()
    if suffix == ".mp4" or path.is_dir():
        return path
    if suffix in OTHER_MEDIA:
        raise AvatarError(f"{name('output')} {path}: avatarcli writes MP4 (H.264 + AAC); name it "
                          f"{path.with_suffix('.mp4')}")
    return path.with_name(path.name + ".mp4")


def existing_output(job: AnimateJob, overwrite: bool) -> bool:
    """The job's output exists and may not be replaced: not `overwrite`, and not a --resume of the unfinished run
    saved beside it (its mp4 appears only at the end, so one found then is an older file the run replaces)."""
    if overwrite or not job.output.exists() or job.output.is_dir():
        return False
    from avatarcli.resume import ResumeFolder

    return not (job.resume and ResumeFolder(job.output).exists())


def _path(value: Any, base: Path | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if base is None or path.is_absolute() else base / path


def _preset(given: dict[str, Any], paths: dict[str, Path | None], base: Path | None, name) -> Any:
    """The preset with the job's overrides: the driver's view of it, then the flags, then step prediction."""
    from avatarcli.presets import load_preset

    preset_name = str(given.get("preset", "balanced"))
    if base is not None and (preset_name.endswith((".yaml", ".yml")) or "/" in preset_name):
        preset_name = str(base / Path(preset_name).expanduser())
    overrides = {key: given.get(key) for key in PRESET_OVERRIDES}
    if given.get("model") == "demo" and paths["driving"] is not None:
        raise AvatarError(f"{name('model')} demo is an audio-driven model: use it with {name('audio')}")
    if paths["driving"] is not None and overrides["fps"] is not None:
        raise AvatarError(f"{name('fps')} does not apply to {name('driving')}: the video keeps the driving video's "
                          "frame rate")
    preset = load_preset(preset_name).for_driver("driving" if paths["driving"] is not None else "audio")
    defaults, source = model_defaults(given.get("model"), paths["weights"], preset.name)
    if defaults:
        preset = preset.with_defaults(defaults, source)
    preset = preset.with_overrides(**overrides)
    knobs = {knob: given.get(key) for key, knob in PREDICTION_KNOBS.items()}
    return preset.with_prediction(given.get("predict"), **knobs)


MODEL_DEFAULTS_FILE = "avatarcli-defaults.yaml"
NOT_MODEL_SETTINGS = ("name", "description", "driving", "drivers")


def model_defaults(model: str | None, weights: Path | None, preset: str = "") -> tuple[dict[str, Any], str]:
    """A model's own settings and where they come from: the preset fields that its weights folder's
    avatarcli-defaults.yaml sets (the demo model ships one: its size and guidance scales). They take the place of
    the preset's values; the user's flags override both. The file's `presets:` section gives settings for one preset
    by name, over the model's general ones (a one-step preset may want gentler guidance than a 50-step grid).
    ({}, "") when the folder has none."""
    path = _model_defaults_path(model, weights)
    if path is None:
        return {}, ""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise AvatarError(f"{path}: cannot read the model's settings ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise AvatarError(f"{path}: the model's settings must be a mapping of preset fields")
    per_preset = data.pop("presets", None) or {}
    if not isinstance(per_preset, dict) or not all(isinstance(v, dict) for v in per_preset.values()):
        raise AvatarError(f"{path}: 'presets' must map preset names to their settings")
    for section in [data, *per_preset.values()]:
        _check_model_settings(section, path)
    return {**data, **per_preset.get(preset, {})}, f"{path} (the model's settings)"


def _model_defaults_path(model: str | None, weights: Path | None) -> Path | None:
    folder = weights.expanduser() if weights is not None else None
    if folder is None and model == "demo":
        from avatarcli.demo.model import demo_weights_dir

        folder = demo_weights_dir()
    path = folder / MODEL_DEFAULTS_FILE if folder is not None else None
    return path if path is not None and path.is_file() else None


def _check_model_settings(data: dict[str, Any], path: Path) -> None:
    from avatarcli.presets import Preset

    allowed = [f for f in Preset.__dataclass_fields__ if f not in NOT_MODEL_SETTINGS]
    unknown = [key for key in data if key not in allowed]
    if unknown:
        raise AvatarError(f"{path}: unknown setting '{unknown[0]}' (allowed: {', '.join(allowed)}, presets)")


def check_choices(given: dict[str, Any], name: Callable[[str], str] = cli_name) -> None:
    """The options with a fixed set of values, and the CRF range."""
    for key, value in given.items():
        choices = OPTIONS[key].choices if key in OPTIONS else ()
        if choices and value not in choices:
            listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise AvatarError(f"{name(key)} must be {listed}, got {value!r}")
    crf = given.get("crf")
    if crf is not None and not 0 <= crf <= 51:
        raise AvatarError(f"{name('crf')} must be between 0 and 51, got {crf}")


def check_job(job: AnimateJob, processes: int = 1, name: Callable[[str], str] = cli_name) -> None:
    """The rules that tie a job's settings together and to the launch (`processes` sharing it); no file is read."""
    check_choices({key: getattr(job, key) for key in ("offload", "weights_dtype", "precision", "overlap_decode",
                                                       "model", "crf", "compile")}, name)
    if job.driving_input is None:
        given = [key for key in DRIVING_INPUTS if getattr(job, key) is not None]
        options = " or ".join(name(key) for key in DRIVING_INPUTS)
        raise AvatarError(f"give exactly one of {options} (got {'both' if given else 'neither'})")
    if job.preset.size != "auto":  # the limits of avatarcli/limits.py, before any file is read
        width, height = (int(side) for side in job.preset.size.split("x"))
        check_frame_size(width, height, job.driving_input, f"{name('size')} {job.preset.size}")
    if job.resume and processes > 1:
        raise AvatarError(f"{name('resume')} works with one process: drop --gpus (or torchrun) to continue a saved "
                          "run")
    if job.context_parallel < 1 or processes % job.context_parallel:
        raise AvatarError(f"{name('context_parallel')} {job.context_parallel} must divide the {processes} processes "
                          "(--gpus)")
    if job.context_parallel > 1 and job.device == "cpu":
        raise AvatarError(f"{name('context_parallel')} runs on GPUs (diffusers' context parallelism needs an "
                          "accelerator)")
    if job.context_parallel > 1 and processes == 1:
        raise AvatarError(f"{name('context_parallel')} splits the work of several processes: use it with --gpus "
                          "(or torchrun)")


def manifest_table() -> str:
    """The README's table of manifest keys, from OPTIONS."""
    kinds = {str: "text", int: "integer", bool: "true/false", NUMBER: "number"}
    rows = ["| key | value | what it sets |", "| --- | --- | --- |"]
    for option in OPTIONS.values():
        value = " / ".join(option.choices) if option.choices else kinds[option.kind]
        rows.append(f"| `{option.name.replace('_', '-')}` | {value} | {option.help.replace('|', '/')} |")
    return "\n".join(rows)
