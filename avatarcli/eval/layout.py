"""Where the face and the mouth are in a frame: the demo world's fixed layout, or a face detector.

The demo world (the synthetic talking faces the demo model is trained on) draws every frame at 128x128 RGB, 25 fps,
with the face inside FACE_BOX and the mouth inside MOUTH_BOX whatever the head sway. Its open mouth is near-black
(luma <= DARK_LUMA), the closed mouth a thin lip-coloured line, skin luma >= 100, and nothing else inside MOUTH_BOX is
dark, so the fraction of dark pixels in MOUTH_BOX is the mouth's openness.

The demo world also fixes where hair, skin, shirt and background are (`demo_part_masks`): the pixels that show the
same part in every frame of every demo-world video, whatever the identity, head sway, blink or mouth opening.

Real videos have no known layout: the face box comes from MTCNN (`FaceDetector`, avatarcli/eval/faces.py; its weights
ship inside a dependency, no download), and the mouth box is the lower-middle part of that face box (MOUTH_IN_FACE).
Boxes are (x0, y0, x1, y1) as fractions of the width and height, so they do not depend on the frame size.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from avatarcli.demo import world
from avatarcli.errors import AvatarError

# The demo world's contract, as avatarcli/demo/world.py states it.
DEMO_SIZE = (world.SIZE, world.SIZE)  # width, height
DEMO_FPS = world.FPS
FACE_BOX = world.FACE_BOX
MOUTH_BOX = world.MOUTH_BOX
DARK_LUMA = float(world.DARK_LUMA)  # an open mouth's interior is at most this dark (BT.601 luma, 0-255)

# The demo world's parts that `eval` measures against the portrait, and how their masks are made (demo_part_masks).
DEMO_PARTS = ("hair", "skin", "shirt", "background")
PART_IDENTITIES = 32  # extreme identities the part maps are intersected over
PART_PROBE = 256  # identities drawn to find each geometry parameter's range
PART_MARGIN = 1  # pixels taken off every mask's edge: sways between the extremes, parameters just past the probe's

# Real videos: the mouth as a part of the detected face box (fractions of the face box), and "dark" relative to the
# face's median luma, because lighting varies from video to video.
MOUTH_IN_FACE = (0.25, 0.65, 0.75, 0.95)
MIN_FACE = 0.1  # the detector looks for faces of at least this fraction of the frame's short side ...
MIN_FACE_PIXELS = 20  # ... and at least this many pixels
DARK_FRACTION_OF_FACE = 0.45

LAYOUTS = ("auto", "demo", "detect")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Regions:
    """Face and mouth boxes (fractions) and the luma at or below which a mouth pixel counts as open."""

    face: Box
    mouth: Box
    dark_luma: float


def demo_regions() -> Regions:
    return Regions(FACE_BOX, MOUTH_BOX, DARK_LUMA)


def resolve_layout(layout: str, width: int, height: int) -> str:
    """`auto` is `demo` for the demo world's 128x128 frames and `detect` for anything else."""
    if layout not in LAYOUTS:
        raise AvatarError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        return "demo" if (width, height) == DEMO_SIZE else "detect"
    return layout


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Fractional box -> integer pixel box [x0, x1) x [y0, y1), at least one pixel each way."""
    x0, y0 = int(round(box[0] * width)), int(round(box[1] * height))
    x1, y1 = int(round(box[2] * width)), int(round(box[3] * height))
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop(frame: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = pixel_box(box, frame.shape[1], frame.shape[0])
    return frame[y0:y1, x0:x1]


def mouth_in_face(face: Box) -> Box:
    """The lower-middle part of a face box, where a frontal face's mouth is."""
    fx0, fy0, fx1, fy1 = face
    w, h = fx1 - fx0, fy1 - fy0
    mx0, my0, mx1, my1 = MOUTH_IN_FACE
    return (fx0 + mx0 * w, fy0 + my0 * h, fx0 + mx1 * w, fy0 + my1 * h)


def parse_box(text: str) -> Box:
    """'x0,y0,x1,y1' (fractions of width and height) -> a box, checked."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise AvatarError(f"a box is four fractions x0,y0,x1,y1, got {text!r}") from error
    if len(values) != 4 or not (0 <= values[0] < values[2] <= 1 and 0 <= values[1] < values[3] <= 1):
        raise AvatarError(f"a box is four fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, got {text!r}")
    return values  # type: ignore[return-value]


class FaceDetector:
    """The largest face in an RGB frame, as a fractional box: MTCNN (avatarcli/eval/faces.py), whose weights ship
    inside a dependency, so it works offline. Faces smaller than MIN_FACE of the frame's short side are not looked
    for."""

    def __init__(self) -> None:
        from avatarcli.eval.faces import Mtcnn

        self._mtcnn = Mtcnn.load()

    def __call__(self, frame: np.ndarray) -> Box | None:
        height, width = frame.shape[:2]
        faces = self._mtcnn.detect(frame, min_face=max(MIN_FACE_PIXELS, MIN_FACE * min(width, height)))
        if len(faces) == 0:
            return None
        x0, y0, x1, y1 = max(faces[:, :4], key=lambda f: (f[2] - f[0]) * (f[3] - f[1]))
        return (max(x0, 0.0) / width, max(y0, 0.0) / height, min(x1 + 1, width) / width, min(y1 + 1, height) / height)


def detected_regions(face: Box, frame: np.ndarray) -> Regions:
    """Regions for a real video from a face box: the mouth below, 'dark' relative to the face's median luma."""
    from avatarcli.eval.metrics import luma

    median = float(np.median(luma(crop(frame, face))))
    return Regions(face, mouth_in_face(face), DARK_FRACTION_OF_FACE * median)


# ---------------------------------------------------------------------------------------------- demo-world parts


def _extreme_identities(count: int = PART_IDENTITIES, probe: int = PART_PROBE) -> list[world.Identity]:
    """Identities whose every geometry parameter (the float fields of world.Identity) sits at the smallest or the
    largest value among `probe` identities of the world, the choice per parameter drawn from a fixed seed (all
    smallest and all largest included). Each part's outline grows, shrinks or slides steadily with each parameter, so
    a pixel that shows the same part for all of these does so for the identities between them, up to the pixel that
    PART_MARGIN takes off (tests/test_eval_regions.py checks this on identities the masks were not made from)."""
    drawn = [world.random_identity(seed) for seed in range(probe)]
    names = [f.name for f in dataclasses.fields(world.Identity) if isinstance(getattr(drawn[0], f.name), float)]
    low = {name: min(getattr(i, name) for i in drawn) for name in names}
    high = {name: max(getattr(i, name) for i in drawn) for name in names}
    rng = np.random.default_rng(0)
    corners = [np.ones(len(names), bool), np.zeros(len(names), bool)] + [
        rng.integers(0, 2, len(names)).astype(bool) for _ in range(count - 2)]
    return [dataclasses.replace(drawn[0], **{name: high[name] if up else low[name] for name, up in zip(names, pick)})
            for pick in corners]


def _erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary erosion by a 3x3 square, `pixels` times (the frame's border does not erode)."""
    for _ in range(pixels):
        padded = np.pad(mask, 1, constant_values=True)
        h, w = mask.shape
        out = mask.copy()
        for dy in range(3):
            for dx in range(3):
                out &= padded[dy : dy + h, dx : dx + w]
        mask = out
    return mask


@functools.lru_cache(maxsize=4)
def _demo_part_masks(width: int, height: int) -> tuple[tuple[str, np.ndarray], ...]:
    sway_x, sway_y = world.MAX_SWAY
    sure = None
    for identity in _extreme_identities():
        for dx in (-sway_x, sway_x):
            for dy in (-sway_y, sway_y):
                # mouth wide open and eyes open: the largest lips and eyes (a closed mouth or lid covers less)
                parts = world.part_map(identity, world.FrameState(1.0, 0.0, dx, dy))
                sure = parts if sure is None else np.where(sure == parts, sure, -1)
    x0, y0, x1, y1 = pixel_box(MOUTH_BOX, world.SIZE, world.SIZE)
    sure[y0:y1, x0:x1] = -1  # as for drift: speaking is not a change of identity
    masks = []
    for name in DEMO_PARTS:
        mask = _erode(sure == world.PARTS.index(name), PART_MARGIN)
        if (width, height) != DEMO_SIZE:  # --layout demo on another size: the same fractions of the frame
            rows = np.minimum((np.arange(height) + 0.5) * world.SIZE // height, world.SIZE - 1).astype(int)
            cols = np.minimum((np.arange(width) + 0.5) * world.SIZE // width, world.SIZE - 1).astype(int)
            mask = mask[rows[:, None], cols[None, :]]
        mask.flags.writeable = False
        masks.append((name, mask))
    return tuple(masks)


def demo_part_masks(width: int = DEMO_SIZE[0], height: int = DEMO_SIZE[1]) -> dict[str, np.ndarray]:
    """The demo world's hair, skin, shirt and background as [height, width] boolean masks (read-only): the pixels that
    show that part in every frame of every demo-world video.

    Made from the world's own drawing (`world.part_map`, which renders a frame with one flat colour per part): the
    part maps of extreme identities (`_extreme_identities`) at the four largest head sways (`world.MAX_SWAY`), mouth
    open, are intersected; pixels on a part's edge count as none, brows as hair. Then MOUTH_BOX is taken out and every
    mask loses PART_MARGIN pixels at its edge. At 128x128 (the world's size): hair is a band across the top of the
    head (162 px), skin the cheeks beside and below the eyes, the bridge of the nose and the jaw beside the mouth box
    (1002 px), shirt the shoulders (562 px), background the frame outside the hair and the shoulders (7630 px). Other
    sizes (--layout demo on a video that is not 128x128) take the 128x128 masks' nearest pixels. Computed once per
    size (about a third of a second)."""
    return dict(_demo_part_masks(width, height))
