"""The portrait: one still image, upright, RGB, with any transparency flattened onto white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from avatarcli.errors import AvatarError

WHITE = (255, 255, 255)


def load_portrait(path: str | Path) -> Image.Image:
    """Read any image PIL can decode (OpenCV as a fallback when installed) as an upright RGB image.

    Raises AvatarError naming the file when it is missing, a folder, or not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise AvatarError(f"portrait image not found: {path}; check the path")
    if path.is_dir():
        raise AvatarError(f"portrait path is a folder, not an image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            # Phone photos store the camera rotation in EXIF instead of rotating the pixels.
            image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        image = _load_with_opencv(path)
        if image is None:
            raise AvatarError(
                f"cannot read portrait image {path}: unsupported or corrupt image file ({error}); use PNG or JPEG"
            ) from error
    return _flatten_onto_white(image)


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
