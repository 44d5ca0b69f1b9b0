"""Named generation settings (presets/*.yaml) and the rules that turn "auto" values into concrete ones.

A preset file is a flat YAML mapping of the `Preset` fields (its name is the file name). Every value is
checked on load; a mistake is an AvatarError naming the file, the key and what is allowed. Sections for
later features (such as step prediction) become nested mappings with their own dataclass field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import avatarcli
from avatarcli.errors import AvatarError
from avatarcli.sampling.predict import Prediction

GUIDANCE_MODES = ("cfg", "ang", "expression")  # expression: FlashPortrait's expression CFG (driving video)
BLEND_SCHEMES = ("log", "uniform", "linear")
CHECKPOINTS = ("auto", "square", "rec-vec")

# StableAvatar was trained at these three resolutions (digest §1.1); "auto" picks one by aspect ratio.
SQUARE_SIZE = (512, 512)
PORTRAIT_SIZE = (480, 832)
LANDSCAPE_SIZE = (832, 480)
NEAR_SQUARE_ASPECT = (0.8, 1.25)

_SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Settings for one generation run.

    `guidance` picks the guidance rule: "cfg" is the public code's 3-branch text/audio CFG
    (text_scale, audio_scale); "ang" is the paper's Audio Native Guidance (ang_alpha, ang_beta).
    `overlap` counts latent frames shared by neighbouring windows, `blend` their weighting.
    """

    name: str
    description: str
    steps: int
    guidance: str
    overlap: int
    blend: str
    size: str
    fps: int
    # Defaults: the reference inference.sh CFG scales and the paper's ANG alpha/beta, so switching
    # `guidance` through an override starts from the published values.
    text_scale: float = 3.0
    audio_scale: float = 5.0
    ang_alpha: float = 4.5
    ang_beta: float = 3.0
    shift: float = 5.0
    checkpoint: str = "auto"
    seed: int | None = None
    # The driving-video driver (FlashPortrait): expression CFG scale, the reference image's longer side, and the
    # preset's settings for that driver (a mapping of the keys above, applied by `for_driver("driving")`).
    emo_scale: float = 4.0
    max_size: int = 720
    driving: dict | None = None
    # FlashPortrait's released 4-step path (fast_infer.py): the step-distill schedule and its x0-then-renoise update,
    # the step-distill LoRA merged at this strength (0: none), and the tiny video decoder.
    schedule: str = "flow"
    lora_strength: float = 0.0
    decoder: str = "full"
    drivers: tuple = ("audio", "driving")  # the drivers this preset is made for

    def for_driver(self, driver: str) -> Preset:
        """The settings a driver runs with: the driving-video driver takes the preset's `driving` section over the
        top-level values (FlashPortrait's published defaults where the preset has none)."""
        if driver not in self.drivers:
            flag = {"audio": "--audio", "driving": "--driving"}.get(driver, driver)
            raise AvatarError(f"preset '{self.name}' is for {' or '.join('--' + d for d in self.drivers)}, "
                              f"not {flag}")
        if driver != "driving":
            if self.guidance == "expression":
                raise AvatarError(f"preset '{self.name}': guidance 'expression' is for a --driving video")
            return self
        values = dataclasses.asdict(self)
        values.update(DRIVING_DEFAULTS)
        values.update(self.driving or {})
        values["driving"] = None
        return _build(values, source=f"preset '{self.name}' (driving section)", explicit=set(self.driving or {}))
    prediction: Prediction | None = None  # step prediction (avatarcli/sampling/predict.py); None: every step full

    def with_prediction(self, enabled: bool | None = None, **knobs: Any) -> Preset:
        """A copy with step prediction switched on/off (None: as the preset) and its knobs replaced (None: keep)."""
        given = {key: value for key, value in knobs.items() if value is not None}
        if enabled is False:
            if given:
                raise AvatarError(f"prediction setting '{next(iter(given))}' was given with prediction off")
            return dataclasses.replace(self, prediction=None)
        if self.prediction is None and not enabled and not given:
            return self
        base = dataclasses.asdict(self.prediction) if self.prediction is not None else {}
        checked = _check_value("prediction", {**base, **given}, f"preset '{self.name}' with overrides")
        return dataclasses.replace(self, prediction=checked)

    def with_overrides(self, **flags: Any) -> Preset:
        """A copy with the given fields replaced and validated again.

        A value of None means "not given" (how CLI options arrive) and keeps the preset's value.
        """
        given = {key: value for key, value in flags.items() if value is not None}
        values = dataclasses.asdict(self)
        values["prediction"] = self.prediction  # already checked; asdict made it a mapping
        values.update(given)
        return _build(values, source=f"preset '{self.name}' with overrides", explicit=set(given))


_FIELDS = {field.name: field for field in dataclasses.fields(Preset)}
# FlashPortrait's published settings (infer.py): 30 Euler steps at shift 5, windows of 51 latent frames overlapping
# by 30 with a linear blend, expression CFG 4 without text CFG.
DRIVING_DEFAULTS = {"steps": 30, "guidance": "expression", "overlap": 30, "blend": "linear", "emo_scale": 4.0,
                    "text_scale": 1.0, "shift": 5.0}
_DRIVING_KEYS = ("steps", "guidance", "overlap", "blend", "emo_scale", "text_scale", "shift", "max_size", "size",
                 "seed", "description", "schedule", "lora_strength", "decoder", "prediction")
SCHEDULES = ("flow", "step_distill")
DECODERS = ("full", "tiny")
DRIVERS = ("audio", "driving")
_REQUIRED_KEYS = ("description", "steps", "guidance", "overlap", "blend", "size", "fps")
# Guidance scales only mean something for their own guidance rule; setting the other rule's scales
# would be silently ignored, so it is rejected.
_GUIDANCE_KEYS = {"cfg": ("text_scale", "audio_scale"), "ang": ("ang_alpha", "ang_beta"),
                  "expression": ("emo_scale", "text_scale")}


def presets_dir() -> Path:
    override = os.environ.get("AVATARCLI_PRESETS_DIR")
    if override:
        return Path(override).expanduser()
    return Path(avatarcli.__file__).resolve().parent.parent / "presets"


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a preset by name (a file in `presets_dir()`) or from a YAML file path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise AvatarError(f"preset file {path} does not exist")
        return _load_file(path)
    path = presets_dir() / f"{text}.yaml"
    if not path.is_file():
        known = ", ".join(path.stem for path in sorted(presets_dir().glob("*.yaml"))) or "none"
        raise AvatarError(f"unknown preset '{text}': choose one of {known}, or give a path to a .yaml file")
    return _load_file(path)


def list_presets() -> list[Preset]:
    """All presets in `presets_dir()`, sorted by name."""
    folder = presets_dir()
    if not folder.is_dir():
        return []
    return [_load_file(path) for path in sorted(folder.glob("*.yaml"))]


def _load_file(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise AvatarError(f"{path}: cannot read preset ({reason})")
    if not isinstance(data, dict):
        raise AvatarError(f"{path}: a preset must be a YAML mapping of settings")
    for key in data:
        if key == "name" or key not in _FIELDS:
            allowed = ", ".join(name for name in _FIELDS if name != "name")
            raise AvatarError(f"{path}: unknown key '{key}' (allowed keys: {allowed})")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise AvatarError(f"{path}: missing key '{key}'")
    return _build({**data, "name": path.stem}, source=str(path), explicit=set(data))


def _build(values: dict[str, Any], source: str, explicit: set[str]) -> Preset:
    checked = {key: _check_value(key, value, source) for key, value in values.items()}
    guidance = checked["guidance"]
    own = set(_GUIDANCE_KEYS[guidance])
    for mode, keys in _GUIDANCE_KEYS.items():
        stray = [key for key in keys if key in explicit and key not in own]
        if stray:
            raise AvatarError(f"{source}: '{stray[0]}' applies only to guidance '{mode}', but guidance is '{guidance}'")
    return Preset(**checked)


def _check_value(key: str, value: Any, source: str) -> Any:
    def fail(expected: str) -> AvatarError:
        return AvatarError(f"{source}: '{key}' must be {expected}, got {value!r}")

    if key in ("name", "description"):
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if key == "drivers":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or any(v not in DRIVERS for v in value):
            raise fail("a list of drivers from " + ", ".join(DRIVERS))
        return tuple(value)
    if key in ("guidance", "blend", "checkpoint", "schedule", "decoder"):
        allowed = {"guidance": GUIDANCE_MODES, "blend": BLEND_SCHEMES, "checkpoint": CHECKPOINTS,
                   "schedule": SCHEDULES, "decoder": DECODERS}[key]
        if value not in allowed:
            raise fail("one of " + ", ".join(allowed))
        return value
    if key == "driving":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise fail("a mapping of settings for the driving-video driver")
        for name in value:
            if name not in _DRIVING_KEYS:
                raise AvatarError(f"{source}: unknown key 'driving.{name}' (allowed: {', '.join(_DRIVING_KEYS)})")
        return {name: _check_value(name, item, f"{source}: driving") for name, item in value.items()}
    if key in ("steps", "overlap", "fps", "seed", "max_size"):
        low, high = {"steps": (1, None), "overlap": (1, 50), "fps": (1, 60), "seed": (0, _MAX_SEED),
                     "max_size": (64, 4096)}[key]
        expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        if key == "seed" and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(expected + (" or null" if key == "seed" else ""))
        if value < low or (high is not None and value > high):
            raise fail(expected)
        return value
    if key in ("text_scale", "audio_scale", "ang_alpha", "ang_beta", "shift", "emo_scale", "lora_strength"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        if key == "shift" and not value > 0:
            raise fail("a number > 0")
        if key != "shift" and not value >= 0:
            raise fail("a number >= 0")
        return float(value)
    if key == "prediction":
        if value is None or isinstance(value, Prediction):
            return value
        return _check_prediction(value, source)
    if key == "size":
        if value != "auto":
            _parse_size(value, fail)
        return value
    raise AvatarError(f"{source}: unknown key '{key}'")


# key -> (type, low, high); a float range excludes its low end
_PREDICTION_KEYS = {"order": (int, 1, 3), "max_predicted": (int, 1, 20), "tolerance": (float, 0.0, 1.0),
                    "warmup": (int, 2, 20), "layer_ratio": (float, 0.0, 1000.0)}


def _check_prediction(value: Any, source: str) -> Prediction:
    """The `prediction` section: null (every step computed) or a mapping of the Prediction fields."""
    if not isinstance(value, dict):
        raise AvatarError(f"{source}: 'prediction' must be null or a mapping of "
                          f"{', '.join(_PREDICTION_KEYS)}, got {value!r}")
    checked = {}
    for key, item in value.items():
        if key not in _PREDICTION_KEYS:
            raise AvatarError(f"{source}: unknown key 'prediction.{key}' (allowed keys: {', '.join(_PREDICTION_KEYS)})")
        kind, low, high = _PREDICTION_KEYS[key]
        if kind is int:
            ok = isinstance(item, int) and not isinstance(item, bool) and low <= item <= high
            expected = f"an integer from {low} to {high}"
        else:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) and (
                (low < item <= high) if key == "tolerance" else (low <= item <= high))
            expected = (f"a number in ({low:g}, {high:g}]" if key == "tolerance"
                        else f"a number from {low:g} to {high:g}")
        if not ok:
            raise AvatarError(f"{source}: 'prediction.{key}' must be {expected}, got {item!r}")
        checked[key] = float(item) if kind is float else item
    return Prediction(**checked)


def _parse_size(value: Any, fail) -> tuple[int, int]:
    expected = "'auto' or 'WxH' with W and H multiples of 16 and at least 64 (e.g. 512x512)"
    match = _SIZE_PATTERN.match(value) if isinstance(value, str) else None
    if match is None:
        raise fail(expected)
    width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16 or width < 64 or height < 64:
        raise fail(expected)
    return width, height


def resolve_size(size: str, image_width: int, image_height: int) -> tuple[int, int]:
    """Output (width, height): an explicit "WxH", or for "auto" the training resolution nearest the image's shape."""
    if size != "auto":
        def fail(expected: str) -> AvatarError:
            return AvatarError(f"size must be {expected}, got {size!r}")

        return _parse_size(size, fail)
    aspect = image_width / image_height
    if NEAR_SQUARE_ASPECT[0] <= aspect <= NEAR_SQUARE_ASPECT[1]:
        return SQUARE_SIZE
    return PORTRAIT_SIZE if aspect < 1 else LANDSCAPE_SIZE


def resolve_checkpoint(checkpoint: str, width: int, height: int) -> str:
    """"square" or "rec-vec". For "auto": the square transformer (trained on 512x512) for near-square
    output, the rec-vec one (trained on 480x832 and 832x480) otherwise."""
    if checkpoint not in CHECKPOINTS:
        raise AvatarError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if checkpoint != "auto":
        return checkpoint
    aspect = width / height
    return "square" if NEAR_SQUARE_ASPECT[0] <= aspect <= NEAR_SQUARE_ASPECT[1] else "rec-vec"
