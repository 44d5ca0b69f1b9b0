"""A synthetic talking-face world: flat-shaded frontal faces whose mouths follow the loudness of synthetic speech.

Torch-free (numpy + Pillow) and deterministic from seeds. Everything is 128x128 RGB at 25 fps with 16 kHz audio.

Layout contract (what `avatarcli eval` relies on to find face and mouth on videos of this world), as fractions
(x0, y0, x1, y1) of width and height, valid at any head sway:
  * the face lies inside FACE_BOX;
  * the mouth lies inside MOUTH_BOX; the open mouth's interior is near-black (luma <= 40), the closed mouth a thin
    lip-coloured line, skin has luma >= 100, and nothing else dark (hair, eyes, brows, background) is inside
    MOUTH_BOX. Mouth openness is therefore the fraction of dark pixels in MOUTH_BOX.
Which part of the picture (background, shirt, hair, skin, ...) each pixel of a frame shows is `part_map`, drawn by
`render_frame` itself; the head sways by at most MAX_SWAY. `avatarcli eval` intersects part maps over identities and
sways to get the pixels that show the same part in every frame of every video of this world (avatarcli/eval/layout.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from avatarcli.media.audio import SAMPLE_RATE

SIZE = 128
FPS = 25
FACE_BOX = (0.18, 0.12, 0.82, 0.92)
MOUTH_BOX = (0.36, 0.62, 0.64, 0.82)
DARK_LUMA = 40  # the open mouth's interior is at most this dark; nothing else in MOUTH_BOX is
MIN_SKIN_LUMA = 100

_SUPERSAMPLE = 2
_FACE_CENTRE_Y = 0.54
_SWAY_X, _SWAY_Y = 0.02, 0.01  # largest head offset, fraction of the frame
MAX_SWAY = (_SWAY_X, _SWAY_Y)  # largest |dx|, |dy| of a FrameState that `motion` produces
_MOUTH_OFFSET = 0.165  # mouth centre below the face centre
_MOUTH_OPEN = 0.045  # largest half-height of the open mouth's interior
_LIP = 0.012  # lip thickness
_INTERIOR = (24, 10, 14)


def luma(rgb) -> np.ndarray:
    """ITU-R BT.601 luma of RGB values (any shape [..., 3])."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@dataclass(frozen=True)
class Identity:
    """Everything that makes one person of the world look like themselves."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    background_low: tuple[int, int, int]
    shirt: tuple[int, int, int]
    iris: tuple[int, int, int]
    lips: tuple[int, int, int]
    face_rx: float  # half width of the face, fraction of the frame
    face_ry: float  # half height
    face_power: float  # superellipse exponent: 2 = ellipse, larger = squarer jaw
    eye_spacing: float  # eye centre distance from the face's midline
    eye_width: float
    eye_height: float
    mouth_width: float  # half width of the mouth
    hair_length: float  # where the hair ends, below the face centre (negative: above it)
    fringe: float  # how far the fringe reaches down from the top of the head
    brow: float  # eyebrow thickness


def _colour(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))


def random_identity(seed: int) -> Identity:
    """A person of the world, drawn deterministically from `seed`."""
    rng = np.random.default_rng([seed, 7])
    while True:  # warm skin tones, bright enough for the contract (luma >= 100 with margin)
        r = rng.uniform(150, 255)
        skin = (int(r), int(r * rng.uniform(0.68, 0.86)), int(r * rng.uniform(0.52, 0.76)))
        if luma(skin) >= MIN_SKIN_LUMA + 12:
            break
    red = np.array([190.0, 60.0, 75.0])
    lips = tuple(int(v) for v in np.clip(0.55 * np.array(skin) + 0.45 * red * rng.uniform(0.9, 1.15), 0, 255))
    return Identity(
        skin=skin, hair=_colour(rng), background=_colour(rng), background_low=_colour(rng), shirt=_colour(rng),
        iris=_colour(rng, 20, 160), lips=lips,
        face_rx=float(rng.uniform(0.25, 0.27)), face_ry=float(rng.uniform(0.34, 0.36)),
        face_power=float(rng.uniform(2.8, 3.6)), eye_spacing=float(rng.uniform(0.085, 0.125)),
        eye_width=float(rng.uniform(0.035, 0.05)), eye_height=float(rng.uniform(0.018, 0.028)),
        mouth_width=float(rng.uniform(0.06, 0.085)), hair_length=float(rng.uniform(-0.2, 0.12)),
        fringe=float(rng.uniform(0.07, 0.17)), brow=float(rng.uniform(0.008, 0.016)),
    )


@dataclass(frozen=True)
class FrameState:
    openness: float = 0.0  # 0 closed .. 1 fully open
    blink: float = 0.0  # 0 eyes open .. 1 closed
    dx: float = 0.0  # head sway, fraction of the frame
    dy: float = 0.0


def _superellipse(cx: float, cy: float, rx: float, ry: float, power: float, n: int = 120) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([cx + rx * np.sign(c) * np.abs(c) ** (2 / power),
                     cy + ry * np.sign(s) * np.abs(s) ** (2 / power)], axis=1)


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill, scale: float) -> None:
    draw.ellipse([(cx - rx) * scale, (cy - ry) * scale, (cx + rx) * scale, (cy + ry) * scale], fill=fill)


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray, fill, scale: float) -> None:
    draw.polygon([tuple(p) for p in (points * scale).tolist()], fill=fill)


def render_frame(identity: Identity, state: FrameState = FrameState(), size: int = SIZE) -> np.ndarray:
    """One [size, size, 3] uint8 frame."""
    s = size * _SUPERSAMPLE
    idt = identity
    top = np.array(idt.background, dtype=np.float32)
    low = np.array(idt.background_low, dtype=np.float32)
    ramp = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - ramp) + low * ramp, (s, s, 3)).round().astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(canvas))
    draw = ImageDraw.Draw(image)
    cx, cy = 0.5 + state.dx, _FACE_CENTRE_Y + state.dy
    rx, ry = idt.face_rx, idt.face_ry

    # shoulders and neck, behind the face
    _ellipse(draw, cx, 1.14, 0.44, 0.26, idt.shirt, s)
    shade = tuple(int(v * 0.88) for v in idt.skin)
    draw.rectangle([(cx - 0.075) * s, (cy + 0.26) * s, (cx + 0.075) * s, 0.95 * s], fill=shade)
    # hair behind the head, cut off at its length
    hair = _superellipse(cx, cy - 0.01, rx + 0.025, ry + 0.02, idt.face_power)
    hair[:, 1] = np.minimum(hair[:, 1], cy + idt.hair_length)
    _polygon(draw, hair, idt.hair, s)
    # the face, then the fringe over the forehead
    _polygon(draw, _superellipse(cx, cy, rx, ry, idt.face_power), idt.skin, s)
    fringe = _superellipse(cx, cy - 0.01, rx + 0.025, ry + 0.02, idt.face_power)
    fringe[:, 1] = np.minimum(fringe[:, 1], cy - ry + idt.fringe)
    _polygon(draw, fringe, idt.hair, s)

    eye_y = cy - 0.07
    opening = 1.0 - float(np.clip(state.blink, 0, 1))
    for side in (-1, 1):
        ex = cx + side * idt.eye_spacing
        brow_y = eye_y - idt.eye_height - 0.03
        draw.rounded_rectangle([(ex - idt.eye_width * 1.1) * s, (brow_y - idt.brow / 2) * s,
                                (ex + idt.eye_width * 1.1) * s, (brow_y + idt.brow / 2) * s],
                               radius=idt.brow * s / 2, fill=idt.hair)
        if opening > 0.15:
            h = idt.eye_height * opening
            _ellipse(draw, ex, eye_y, idt.eye_width, h, (238, 236, 230), s)
            r = idt.eye_height * 0.85
            _ellipse(draw, ex, eye_y, r, min(r, h), idt.iris, s)
            _ellipse(draw, ex, eye_y, r * 0.45, min(r * 0.45, h), (12, 12, 12), s)
        else:  # closed lid
            draw.rounded_rectangle([(ex - idt.eye_width) * s, (eye_y - 0.004) * s, (ex + idt.eye_width) * s,
                                    (eye_y + 0.004) * s], radius=0.004 * s, fill=shade)
    # nose: a shaded tip, well above MOUTH_BOX
    _ellipse(draw, cx, cy + 0.045, 0.022, 0.014, shade, s)

    # mouth: lips around a near-black interior whose area is proportional to the openness
    my, mw = cy + _MOUTH_OFFSET, idt.mouth_width
    inner = _MOUTH_OPEN * float(np.clip(state.openness, 0, 1))
    _ellipse(draw, cx, my, mw, inner + _LIP, idt.lips, s)
    if inner * s > 0.25:
        _ellipse(draw, cx, my, mw * 0.86, inner, _INTERIOR, s)
    return np.asarray(image.reduce(_SUPERSAMPLE))


# Which part each pixel shows: every part drawn in its own flat colour, each a vertex of the convex hull of all colours
# in a labelled frame (the fixed eye and mouth colours and the skin's shade included), so the 2x2 average of the
# supersampled drawing equals a label colour only where all four sub-pixels are that part.
PARTS = ("background", "shirt", "hair", "skin", "iris", "lips")
_PART_COLOURS = ((0, 0, 200), (0, 200, 0), (200, 200, 0), (200, 0, 0), (0, 200, 200), (200, 0, 200))


def part_map(identity: Identity | int, state: FrameState = FrameState(), size: int = SIZE) -> np.ndarray:
    """[size, size] int8: the index in PARTS of the part each pixel of `render_frame(identity, state, size)` shows
    (the geometry is render_frame's own: the identity is drawn with one flat colour per part), or -1 for anything
    else: eye whites, pupils, the mouth's interior, shaded skin (neck, nose, closed lids) and pixels on an edge between
    two parts. Brows count as hair (they are drawn in the hair's colour)."""
    if isinstance(identity, int):
        identity = random_identity(identity)
    background, shirt, hair, skin, iris, lips = _PART_COLOURS
    labelled = replace(identity, background=background, background_low=background, shirt=shirt, hair=hair, skin=skin,
                       iris=iris, lips=lips)
    frame = render_frame(labelled, state, size).astype(np.int32)
    codes = (frame[..., 0] << 16) | (frame[..., 1] << 8) | frame[..., 2]
    out = np.full(codes.shape, -1, dtype=np.int8)
    for index, (r, g, b) in enumerate(_PART_COLOURS):
        out[codes == (r << 16) | (g << 8) | b] = index
    return out


def portrait(identity: Identity | int, size: int = SIZE) -> Image.Image:
    """The neutral portrait: mouth closed, eyes open, head centred."""
    if isinstance(identity, int):
        identity = random_identity(identity)
    return Image.fromarray(render_frame(identity, FrameState(), size))


# ----------------------------------------------------------------------------------------------------- audio


def speech(seed: int, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Speech-like float32 audio: words of 1-4 voiced syllables (harmonics of a gliding pitch shaped by two
    formants, a short noise burst at each onset) separated by short and long pauses. Deterministic from `seed`."""
    rng = np.random.default_rng([seed, 11])
    n = int(round(seconds * sample_rate))
    f0_base = rng.uniform(95, 230)
    amplitude = np.zeros(n)
    f0 = np.full(n, f0_base)
    f1 = np.full(n, 500.0)
    f2 = np.full(n, 1500.0)
    burst = np.zeros(n)
    t = rng.uniform(0.05, 0.4)
    while t < seconds:
        for _ in range(int(rng.integers(1, 5))):
            duration = rng.uniform(0.12, 0.28)
            a, b = int(t * sample_rate), min(n, int((t + duration) * sample_rate))
            if a >= n:
                break
            x = np.linspace(0, 1, b - a)
            amplitude[a:b] = np.sin(np.pi * x) ** 1.5 * rng.uniform(0.45, 1.0)
            start_pitch, end_pitch = f0_base * rng.uniform(0.85, 1.2, 2)
            f0[a:b] = start_pitch + (end_pitch - start_pitch) * x
            f1[a:b], f2[a:b] = rng.uniform(300, 800), rng.uniform(900, 2300)
            onset = min(b, a + int(0.02 * sample_rate))
            burst[a:onset] = rng.uniform(0.05, 0.2)
            t += duration + rng.uniform(0.0, 0.05)
        t += rng.uniform(0.4, 1.0) if rng.random() < 0.15 else rng.uniform(0.06, 0.35)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = np.zeros(n)
    for k in range(1, int(4000 // (f0_base * 0.85)) + 1):
        fk = k * f0
        gain = (1 + 3 * np.exp(-(((fk - f1) / 120) ** 2)) + 2 * np.exp(-(((fk - f2) / 180) ** 2))) / k
        voice += np.where(fk < 4000, gain, 0.0) * np.sin(k * phase)
    noise = rng.standard_normal(n)
    signal = voice * amplitude + noise * burst + noise * 1e-4
    peak = np.abs(signal).max()
    level = rng.uniform(0.2, 0.5)
    return (signal / peak * level if peak > 0 else signal).astype(np.float32)


def frame_count(num_samples: int, fps: int = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames for an audio clip, rounded as `animate` rounds."""
    return max(1, round(num_samples * fps / sample_rate))


def loudness(samples: np.ndarray, fps: int = FPS, sample_rate: int = SAMPLE_RATE,
             frames: int | None = None) -> np.ndarray:
    """RMS of the audio over each video frame's span [i/fps, (i+1)/fps), zero past the end."""
    frames = frame_count(len(samples), fps, sample_rate) if frames is None else frames
    hop = sample_rate / fps
    out = np.zeros(frames)
    for i in range(frames):
        chunk = samples[int(round(i * hop)) : int(round((i + 1) * hop))]
        out[i] = np.sqrt(np.mean(np.square(chunk, dtype=np.float64))) if len(chunk) else 0.0
    return out


def mouth_openness(samples: np.ndarray, fps: int = FPS, sample_rate: int = SAMPLE_RATE,
                   frames: int | None = None) -> np.ndarray:
    """The renderer's ground-truth mouth openness per video frame, in [0, 1]: the frame's loudness relative to the
    clip's 95th-percentile loudness, clipped. The mouth follows the audio with no lag."""
    rms = loudness(samples, fps, sample_rate, frames)
    reference = np.percentile(rms, 95) if len(rms) else 0.0
    if reference <= 1e-6:
        return np.zeros_like(rms)
    return np.clip(rms / reference, 0.0, 1.0)


def motion(seed: int, frames: int, fps: int = FPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blinks (0..1) and slow head sway (dx, dy) per frame, deterministic from `seed`."""
    rng = np.random.default_rng([seed, 13])
    t = np.arange(frames) / fps
    dx, dy = np.zeros(frames), np.zeros(frames)
    for out, limit in ((dx, _SWAY_X), (dy, _SWAY_Y)):
        weights = rng.uniform(0.3, 1.0, 2)
        weights = weights / weights.sum() * limit * rng.uniform(0.5, 1.0)
        for w in weights:
            out += w * np.sin(2 * np.pi * rng.uniform(0.07, 0.3) * t + rng.uniform(0, 2 * np.pi))
    blink = np.zeros(frames)
    when = rng.uniform(0.3, 3.0)
    while when < t[-1] + 1 if frames else False:
        blink = np.maximum(blink, np.clip(1 - np.abs(t - when) / 0.09, 0, 1))
        when += rng.uniform(1.8, 5.0)
    return blink, dx, dy


def render_video(identity: Identity | int, samples: np.ndarray, motion_seed: int = 0, fps: int = FPS,
                 sample_rate: int = SAMPLE_RATE, size: int = SIZE) -> np.ndarray:
    """[frames, size, size, 3] uint8: the identity speaking `samples` (mouth from the loudness, blinks, sway)."""
    if isinstance(identity, int):
        identity = random_identity(identity)
    frames = frame_count(len(samples), fps, sample_rate)
    openness = mouth_openness(samples, fps, sample_rate, frames)
    blink, dx, dy = motion(motion_seed, frames, fps)
    return np.stack([render_frame(identity, FrameState(float(o), float(b), float(x), float(y)), size)
                     for o, b, x, y in zip(openness, blink, dx, dy)])


def box_pixels(box: tuple[float, float, float, float], size: int = SIZE) -> tuple[slice, slice]:
    """(rows, cols) slices of a fractional box on a size x size frame."""
    x0, y0, x1, y1 = box
    return slice(int(np.floor(y0 * size)), int(np.ceil(y1 * size))), slice(int(np.floor(x0 * size)),
                                                                            int(np.ceil(x1 * size)))


def dark_fraction(frames: np.ndarray, box: tuple[float, float, float, float] = MOUTH_BOX) -> np.ndarray:
    """Fraction of pixels with luma <= DARK_LUMA inside `box`, per frame ([F, H, W, 3] or [H, W, 3])."""
    frames = np.asarray(frames)
    single = frames.ndim == 3
    frames = frames[None] if single else frames
    rows, cols = box_pixels(box, frames.shape[1])
    dark = (luma(frames[:, rows, cols]) <= DARK_LUMA).mean(axis=(1, 2))
    return dark[0] if single else dark
