"""Named generation settings (presets/*.yaml) and the rules that turn "auto" values into concrete ones.

A preset file is a flat YAML mapping of the `Preset` fields (its name is the file name). Each field declares what it
accepts (avatarcli/schema.py: type, range or choices, and here which guidance a scale belongs to and whether the
driving-video section may set it); one validator walks the fields, so every value is checked on load and on every
override, and a mistake is an AvatarError naming the file, the key and what is allowed. Sections for later features
(such as step prediction) are nested dataclasses with their own declared fields.
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
from avatarcli.sampling.guidance import EXPRESSION_GUIDANCE, PRESET_GUIDANCE
from avatarcli.sampling.guidance_reuse import GuidanceReuse
from avatarcli.sampling.predict import Prediction
from avatarcli.schema import (Reject, SettingError, check_keys, check_value, check_values, choice, integer, number,
                              required, rules, section, setting, text)

BLEND_SCHEMES = ("log", "uniform", "linear")
CHECKPOINTS = ("auto", "square", "rec-vec")
SCHEDULES = ("flow", "step_distill")
DECODERS = ("full", "tiny")
DRIVERS = ("audio", "driving")
# The DiT's numerics (avatarcli/models/wan.py `use_numerics`): reference = modulation, LayerNorms, gated residual adds
# and RoPE in float32 as the published code; fast = all of them in the model's dtype (bf16 on a GPU).
NUMERICS_MODES = ("reference", "fast")

# StableAvatar was trained at these three resolutions (digest §1.1); "auto" picks one by aspect ratio.
SQUARE_SIZE = (512, 512)
PORTRAIT_SIZE = (480, 832)
LANDSCAPE_SIZE = (832, 480)
NEAR_SQUARE_ASPECT = (0.8, 1.25)

_SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
_SIZE_EXPECTED = "'auto' or 'WxH' with W and H multiples of 16 and at least 64 (e.g. 512x512)"
_MAX_SEED = 2**63 - 1


def _size(value: Any) -> str:
    if value != "auto" and _parse_size(value) is None:
        raise Reject(_SIZE_EXPECTED)
    return value


def _drivers(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or any(v not in DRIVERS for v in value):
        raise Reject("a list of drivers from " + ", ".join(DRIVERS))
    return tuple(value)


def _driving_section(value: Any) -> dict | None:
    """The preset's settings for the driving-video driver: a mapping of the fields marked `per_driver`."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Reject("a mapping of settings for the driving-video driver")
    return check_values(Preset, value, allowed=_DRIVING_KEYS)


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Settings for one generation run.

    `guidance` picks the guidance rule: "cfg" is the public code's 3-branch text/audio CFG
    (text_scale, audio_scale); "ang" is the paper's Audio Native Guidance (ang_alpha, ang_beta).
    `overlap` counts latent frames shared by neighbouring windows, `blend` their weighting.

    Field metadata (besides the rule): `in_file=False`: not a key of the file (the name is the file's);
    `per_driver=True`: the `driving` section may set it; `guidance=(...)`: a scale of these guidance rules only (set
    in a file or override under another rule, it would be silently ignored, so it is rejected).
    """

    name: str = text(in_file=False)
    description: str = text(per_driver=True)
    steps: int = integer(1, per_driver=True)
    guidance: str = choice(*PRESET_GUIDANCE, per_driver=True)
    overlap: int = integer(1, 50, per_driver=True)
    blend: str = choice(*BLEND_SCHEMES, per_driver=True)
    size: str = setting(_size, per_driver=True)
    fps: int = integer(1, 60)
    # Defaults: the reference inference.sh CFG scales and the paper's ANG alpha/beta, so switching
    # `guidance` through an override starts from the published values.
    text_scale: float = number(0, default=3.0, guidance=("cfg", EXPRESSION_GUIDANCE), per_driver=True)
    audio_scale: float = number(0, default=5.0, guidance=("cfg",))
    ang_alpha: float = number(0, default=4.5, guidance=("ang",))
    ang_beta: float = number(0, default=3.0, guidance=("ang",))
    shift: float = number(0, above=True, default=5.0, per_driver=True)
    checkpoint: str = choice(*CHECKPOINTS, default="auto")
    seed: int | None = integer(0, _MAX_SEED, null=True, default=None, per_driver=True)
    # The driving-video driver (FlashPortrait): expression CFG scale, the reference image's longer side, and the
    # preset's settings for that driver (a mapping of the keys above, applied by `for_driver("driving")`).
    emo_scale: float = number(0, default=4.0, guidance=(EXPRESSION_GUIDANCE,), per_driver=True)
    max_size: int = integer(64, 4096, default=720, per_driver=True)
    driving: dict | None = setting(_driving_section, default=None)
    # FlashPortrait's released 4-step path (fast_infer.py): the step-distill schedule and its x0-then-renoise update,
    # the step-distill LoRA merged at this strength (0: none), and the tiny video decoder.
    schedule: str = choice(*SCHEDULES, default="flow", per_driver=True)
    lora_strength: float = number(0, default=0.0, per_driver=True)
    decoder: str = choice(*DECODERS, default="full", per_driver=True)
    drivers: tuple = setting(_drivers, default=DRIVERS)  # the drivers this preset is made for
    # step prediction (avatarcli/sampling/predict.py); None: every step full
    prediction: Prediction | None = section(Prediction, per_driver=True)
    # guidance reuse (avatarcli/sampling/guidance_reuse.py); None: every computed step runs every guidance branch
    guidance_reuse: GuidanceReuse | None = section(GuidanceReuse, per_driver=True)
    # the DiT's numerics: "reference" (float32 modulation, norms, residual adds, RoPE) or "fast" (the model's dtype)
    numerics: str = choice(*NUMERICS_MODES, default="reference", per_driver=True)

    def for_driver(self, driver: str) -> Preset:
        """The settings a driver runs with: the driving-video driver takes the preset's `driving` section over the
        top-level values (FlashPortrait's published defaults where the preset has none)."""
        if driver not in self.drivers:
            flag = {"audio": "--audio", "driving": "--driving"}.get(driver, driver)
            raise AvatarError(f"preset '{self.name}' is for {' or '.join('--' + d for d in self.drivers)}, "
                              f"not {flag}")
        if driver != "driving":
            if self.guidance == EXPRESSION_GUIDANCE:
                raise AvatarError(f"preset '{self.name}': guidance '{EXPRESSION_GUIDANCE}' is for a --driving video")
            return self
        values = dataclasses.asdict(self)
        values.update(DRIVING_DEFAULTS)
        values.update(self.driving or {})
        values["driving"] = None
        return _build(values, source=f"preset '{self.name}' (driving section)", explicit=set(self.driving or {}))

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
        source = f"preset '{self.name}' with overrides"
        try:
            checked = check_value(Preset, "prediction", {**base, **given})
        except SettingError as error:
            raise AvatarError(f"{source}: {error}") from None
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

    def with_defaults(self, defaults: dict[str, Any], source: str) -> Preset:
        """A copy with a model's own settings (avatarcli/options.py `model_defaults`) over the preset's. They are
        not the user's: a guidance scale of another guidance rule than the preset's is kept but does nothing."""
        values = dataclasses.asdict(self)
        values["prediction"] = self.prediction
        values.update(defaults)
        return _build(values, source=source, explicit=set())


_FIELDS = rules(Preset)
_FILE_KEYS = [key for key, field in _FIELDS.items() if field.metadata.get("in_file", True)]
_REQUIRED_KEYS = [key for key in required(Preset) if key in _FILE_KEYS]
_DRIVING_KEYS = [key for key, field in _FIELDS.items() if field.metadata.get("per_driver")]
# FlashPortrait's published settings (infer.py): 30 Euler steps at shift 5, windows of 51 latent frames overlapping
# by 30 with a linear blend, expression CFG 4 without text CFG.
DRIVING_DEFAULTS = {"steps": 30, "guidance": EXPRESSION_GUIDANCE, "overlap": 30, "blend": "linear", "emo_scale": 4.0,
                    "text_scale": 1.0, "shift": 5.0}


def presets_dir() -> Path:
    """The folder of the named presets: $AVATARCLI_PRESETS_DIR, else avatarcli/_presets (in a clone a link to the
    top-level presets/ folder, in a wheel or a regular install its copy), else presets/ beside the package (a clone
    on a file system without links)."""
    override = os.environ.get("AVATARCLI_PRESETS_DIR")
    if override:
        return Path(override).expanduser()
    package = Path(avatarcli.__file__).resolve().parent
    installed = package / "_presets"
    return installed if installed.is_dir() else package.parent / "presets"


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


def preset_yaml(preset: Preset) -> str:
    """The preset as a file that `load_preset` reads back to equal settings: every file key but `name` (a file's
    name is its preset's), a guidance scale only under the guidance it belongs to (the loader rejects the others,
    which keep their defaults), plain YAML values."""
    values = {key: _plain(getattr(preset, key)) for key in _FILE_KEYS
              if preset.guidance in _FIELDS[key].metadata.get("guidance", (preset.guidance,))}
    header = f"# preset '{preset.name}': save as a .yaml file and pass its path to --preset\n"
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=1000)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


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
    try:
        check_keys(data, _FILE_KEYS, _REQUIRED_KEYS)
    except SettingError as error:
        raise AvatarError(f"{path}: {error}") from None
    return _build({**data, "name": path.stem}, source=str(path), explicit=set(data))


def _build(values: dict[str, Any], source: str, explicit: set[str]) -> Preset:
    """A Preset from `values` (every field's rule applied); `explicit`: the keys the user set, which must belong
    to the chosen guidance rule if they are a guidance scale."""
    try:
        checked = check_values(Preset, values)
    except SettingError as error:
        raise AvatarError(f"{source}: {error}") from None
    guidance = checked["guidance"]
    for key, field in _FIELDS.items():
        modes = field.metadata.get("guidance")
        if key in explicit and modes and guidance not in modes:
            raise AvatarError(f"{source}: '{key}' applies only to guidance '{modes[0]}', but guidance is '{guidance}'")
    return Preset(**checked)


def _parse_size(value: Any) -> tuple[int, int] | None:
    """(width, height) of a "WxH" size with multiples of 16 of at least 64; None for anything else."""
    match = _SIZE_PATTERN.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16 or width < 64 or height < 64:
        return None
    return width, height


def resolve_size(size: str, image_width: int, image_height: int) -> tuple[int, int]:
    """Output (width, height): an explicit "WxH", or for "auto" the training resolution nearest the image's shape."""
    if size != "auto":
        parsed = _parse_size(size)
        if parsed is None:
            raise AvatarError(f"size must be {_SIZE_EXPECTED}, got {size!r}")
        return parsed
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
