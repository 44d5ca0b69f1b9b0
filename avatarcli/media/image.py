"""The portrait: one still image, upright, RGB, with any transparency flattened onto white.

Any bit depth loads with its real tones (16-bit grey, grey+alpha, RGB, RGBA, TIFF, float). Portraits must be at least
MIN_SIDE pixels on the short side; large ones are downscaled on load to MAX_SIDE on the long side (the video is never
larger than that), and only images above MAX_PIXELS are refused.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from avatarcli.errors import AvatarError
from avatarcli.limits import MAX_PORTRAIT_PIXELS

WHITE = (255, 255, 255)
MIN_SIDE = 64  # px on the short side; smaller portraits would be upscaled from almost nothing
MAX_SIDE = 2048  # px on the long side after loading; every output size and the image encoders need far less
MAX_PIXELS = MAX_PORTRAIT_PIXELS  # refused above this (268 megapixels: about 1 GB decoded as 8-bit RGBA)


def load_portrait(path: str | Path) -> Image.Image:
    """Read any image PIL can decode (OpenCV as a fallback when installed) as an upright 8-bit RGB image.

    Raises AvatarError naming the file when it is missing, a folder, not a readable image, smaller than MIN_SIDE or
    larger than MAX_PIXELS. Images larger than MAX_SIDE are downscaled (no DecompressionBombWarning).
    """
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"portrait image not found: {path}; check the path")
    if path.is_dir():
        raise AvatarError(f"portrait path is a folder, not an image file: {path}")
    try:
        with _own_size_limit(), Image.open(path) as image:
            _check_pixel_count(path, *image.size)
            if image.format == "JPEG" and max(image.size) > MAX_SIDE:
                image.draft("RGB", _fit(image.size, MAX_SIDE))  # decode big JPEGs at 1/2, 1/4 or 1/8 scale
            image.load()
            # Phone photos store the camera rotation in EXIF instead of rotating the pixels.
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:  # only past twice our own limit
        raise AvatarError(_too_large(path, error)) from error
    except (UnidentifiedImageError, OSError, ValueError) as error:
        image = _load_with_opencv(path)
        if image is None:
            raise AvatarError(
                f"cannot read portrait image {path}: unsupported or corrupt image file ({error}); use PNG or JPEG"
            ) from error
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise AvatarError(f"portrait {path} is {width}x{height} pixels; it must be at least {MIN_SIDE} pixels on "
                          f"its short side")
    image = _flatten_onto_white(_to_8_bit(image))
    if max(image.size) > MAX_SIDE:
        image = image.resize(_fit(image.size, MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


@contextmanager
def _own_size_limit():
    """Pillow's decompression-bomb guard, raised to our MAX_PIXELS and without its warning (we check ourselves)."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def _too_large(path: Path, detail: object) -> str:
    return (f"portrait {path} is too large ({detail}); the limit is {MAX_PIXELS // 1_000_000} megapixels "
            f"(16384x16384): scale it down first")


def _check_pixel_count(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise AvatarError(_too_large(path, f"{width}x{height} pixels"))


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    scale = side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float grey images as 8-bit "L" with their tones kept (Pillow's convert clips them).

    Pillow already reduces 16-bit RGB, RGBA and grey+alpha to 8 bits per channel on reading; 16-bit grey stays
    I;16 (0..65535), 32-bit grey is I (read as the same 16-bit range) and float grey is F (0..1).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def _flatten_onto_white(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _load_with_opencv(path: Path) -> Image.Image | None:
    """Second chance for formats PIL lacks; OpenCV is optional and not a dependency."""
    try:
        import cv2
    except ImportError:
        return None
    # IMREAD_COLOR gives 8-bit BGR and applies the EXIF orientation itself.
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
