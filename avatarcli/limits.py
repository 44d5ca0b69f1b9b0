"""Input limits, derived from memory and checked before any model loads (AvatarError: exit 2).

The rule: a job is refused when even its leanest setting could not fit the budget.

* Output frame size, against one 80 GiB GPU (an H100). Peak GPU memory grows with the pixels of one frame (the
  window's tokens and the decoder's full-resolution activations; the video length adds nothing, frames stream):
  - `--audio` (StableAvatar 1.3B, also the demo model): 14.57 GiB at 480x832 with the decode beside the DiT, of which
    4.4 GiB are the DiT's weights: 10.17 GiB / 399,360 pixels = 27.3 kB per pixel -> (80 - 4.4) GiB / 27.3 kB
    = 2.97 megapixels (benchmarks/README.md, bench_animate.py).
  - `--driving` (FlashPortrait 14B): its window-step (2 branches of 51 latent frames) takes 44.35 GiB at 512x512 and
    74.66 GiB at 720x1280: 49.4 kB per pixel; with `--offload group` the weights leave the GPU (14.21 GiB at
    512x512: 2.2 GiB besides the pixels) -> (80 - 2.2) GiB / 49.4 kB = 1.69 megapixels (bench_flashportrait.py).
  - Each side at most 4096 px (the largest `max_size` a preset takes); at least 64 px, multiples of 16 (presets.py).
* Portraits: at most 16384x16384 = 268 megapixels, about 1 GiB decoded as 8-bit RGBA; read from the header first.
* Length, against 1 GiB of host memory for what is held for the whole clip (everything else streams):
  - audio: the 16 kHz float32 samples, 64 kB per second, twice while ffmpeg's output is converted -> 8388 s;
  - a driving video: 554 float32 expression values per frame, 2.2 kB, twice while gaps are interpolated
    -> 242,270 frames.

Nothing here imports torch or reads a file.
"""

from __future__ import annotations

from avatarcli.errors import AvatarError

GIB = 1024**3
GPU_BUDGET = 80 * GIB  # one H100 80GB
HOST_BUDGET = 1 * GIB  # host memory for the data held for the whole clip

# (fixed bytes, bytes per output pixel) of the peak GPU memory, per driver, from the measured peaks above
_AUDIO_PER_PIXEL = round((14.57 - 4.4) * GIB / (480 * 832))
_DRIVING_PER_PIXEL = round((74.66 - 44.35) * GIB / (720 * 1280 - 512 * 512))
FRAME_MEMORY = {
    "audio": (round(4.4 * GIB), _AUDIO_PER_PIXEL),
    "driving": (round(14.21 * GIB) - 512 * 512 * _DRIVING_PER_PIXEL, _DRIVING_PER_PIXEL),
}
MAX_SIDE = 4096
DRIVER_FLAGS = {"audio": "--audio", "driving": "--driving"}

MAX_PORTRAIT_PIXELS = 16384 * 16384  # 268 megapixels: about 1 GiB decoded as 8-bit RGBA

AUDIO_BYTES_PER_SECOND = 2 * 4 * 16000  # float32 at 16 kHz, twice during the conversion
DRIVING_BYTES_PER_FRAME = 2 * 4 * 554  # PD-FGC expression rows, twice during the interpolation
MAX_AUDIO_SECONDS = HOST_BUDGET // AUDIO_BYTES_PER_SECOND  # 8388 s (2 h 19 min)
MAX_DRIVING_FRAMES = HOST_BUDGET // DRIVING_BYTES_PER_FRAME  # 242,270 frames (2 h 41 min at 25 fps)


def max_pixels(driver: str) -> int:
    """The most pixels an output frame of `driver` ("audio" or "driving") may have."""
    fixed, per_pixel = FRAME_MEMORY[driver]
    return (GPU_BUDGET - fixed) // per_pixel


def check_frame_size(width: int, height: int, driver: str, what: str) -> None:
    """AvatarError when a `driver` video of width x height could not fit the budget; `what` names the size
    ("--size 4096x4096")."""
    if max(width, height) > MAX_SIDE:
        raise AvatarError(f"{what} is too large: each side may be at most {MAX_SIDE} px")
    limit = max_pixels(driver)
    if width * height > limit:
        per_pixel = FRAME_MEMORY[driver][1]
        raise AvatarError(
            f"{what} is {width * height / 1e6:.2f} megapixels; with {DRIVER_FLAGS[driver]} at most "
            f"{limit / 1e6:.2f} fit one {GPU_BUDGET // GIB} GiB GPU ({per_pixel / 1000:.1f} kB per pixel): choose a "
            "smaller size")


def check_audio_seconds(seconds: float, path: object) -> None:
    if seconds > MAX_AUDIO_SECONDS:
        raise AvatarError(f"audio {path} is {_duration(seconds)} long; the limit is {_duration(MAX_AUDIO_SECONDS)}: "
                          "split it and animate the parts")


def check_driving_frames(frames: int, fps: float, path: object) -> None:
    if frames > MAX_DRIVING_FRAMES:
        raise AvatarError(f"driving video {path} has {frames:,} frames, {_duration(frames / fps)}; the limit is "
                          f"{MAX_DRIVING_FRAMES:,} frames: split it and animate the parts")


def _duration(seconds: float) -> str:
    """"8389 s (2 h 19 min)", or "75 s" under an hour."""
    minutes = int(seconds // 60)
    return f"{seconds:.0f} s" + (f" ({minutes // 60} h {minutes % 60} min)" if minutes >= 60 else "")


def size_help() -> str:
    """The limits as `--size`'s help states them."""
    return (f"WxH (multiples of 16, 64-{MAX_SIDE} px a side; at most {max_pixels('audio') / 1e6:.2f} megapixels "
            f"with --audio, {max_pixels('driving') / 1e6:.2f} with --driving: what one {GPU_BUDGET // GIB} GiB GPU "
            "holds) or auto.")


def limits_help() -> str:
    """The rule and the numbers, for `animate --help`."""
    audio, driving = FRAME_MEMORY["audio"], FRAME_MEMORY["driving"]
    return (f"Limits, from memory (checked before any model loads; exit 2): an output frame needs about "
            f"{audio[1] / 1000:.1f} kB of GPU memory per pixel with --audio (besides {audio[0] / GIB:.1f} GiB of "
            f"weights) and {driving[1] / 1000:.1f} kB with --driving (weights offloaded), so one "
            f"{GPU_BUDGET // GIB} GiB GPU holds {max_pixels('audio') / 1e6:.2f} and "
            f"{max_pixels('driving') / 1e6:.2f} megapixels, at most {MAX_SIDE} px a side. Portraits: at most "
            f"{MAX_PORTRAIT_PIXELS / 1e6:.0f} megapixels (1 GiB decoded). The whole clip's signal stays in host "
            f"memory (64 kB per second of audio and 2.2 kB per driving frame, twice while decoded) within "
            f"{HOST_BUDGET // GIB} GiB: audio at most {MAX_AUDIO_SECONDS} s, a driving video at most "
            f"{MAX_DRIVING_FRAMES:,} frames.")
