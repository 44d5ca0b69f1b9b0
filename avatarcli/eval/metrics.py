"""The per-frame measurements and the metrics of `avatarcli eval`: plain numpy on uint8 RGB frames, no model weights.

Per frame (computed while the video streams past, see avatarcli/eval/report.py):
- `mouth_openness`: fraction of the mouth box's pixels at or below a luma threshold (the open mouth's dark interior).
- `face_distance`: colour distance of the face box from the reference's face box (CIE Lab, DeltaE 1976, on a coarse
  grid so a pixel or two of head motion matters little; the mouth's cells are left out so speaking is not drift).
- `frame_difference`: mean |frame[t+1] - frame[t]| over all pixels and channels (0-255).
- `mean_luma_outside`: mean BT.601 luma of the frame outside the mouth box (so speaking is not flicker).
- with a second video: `psnr` (RGB, capped at PSNR_CAP dB) and `ssim` (luma, Wang et al. 2004 Gaussian window).
- against the portrait, per region (`RegionDistance`: the whole frame, the face box, and on demo-world videos the
  hair, skin, shirt and background masks of layout.py): `masked_psnr` (RGB over the region's pixels, capped at
  PSNR_CAP) and `masked_delta_e` (mean per-pixel CIE Lab DeltaE76 over the region's pixels). The regions are fixed
  pixels, the same in every frame and in the portrait.

Metrics over the video (functions below): lip sync (`lip_sync`), seams (`seam_scores`), flicker (`flicker`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PSNR_CAP = 100.0  # dB; identical frames (MSE 0) report this instead of infinity
DRIFT_GRID = 16  # the face box is averaged down to DRIFT_GRID x DRIFT_GRID cells before comparing colours


def luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma (0-255, float32) of uint8 or float RGB [..., 3]."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def mouth_openness(mouth: np.ndarray, dark_luma: float) -> float:
    """Fraction of the mouth crop's pixels whose luma is at most `dark_luma` (0 closed ... about 1 wide open)."""
    return float(np.mean(luma(mouth) <= dark_luma))


def _linear(c: np.ndarray) -> np.ndarray:
    """sRGB values in [0, 1] -> linear light."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


_LINEAR_UINT8 = _linear(np.arange(256, dtype=np.float64) / 255.0)  # the same values, looked up for uint8 input


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8 or 0-255 float) -> CIE Lab (D65), float64 [..., 3]."""
    rgb = np.asarray(rgb)
    c = _LINEAR_UINT8[rgb] if rgb.dtype == np.uint8 else _linear(rgb.astype(np.float64) / 255.0)
    xyz = c @ np.array([[0.4124564, 0.2126729, 0.0193339],
                        [0.3575761, 0.7151522, 0.1191920],
                        [0.1804375, 0.0721750, 0.9503041]])  # fmt: skip
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def grid_average(image: np.ndarray, grid: int = DRIFT_GRID) -> np.ndarray:
    """Mean colour of each cell of a grid x grid partition of an [H, W, 3] image (cells as equal as possible)."""
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape[:2]
    rows = np.minimum((np.arange(h) * grid) // h, grid - 1)
    cols = np.minimum((np.arange(w) * grid) // w, grid - 1)
    sums = np.zeros((grid, grid, image.shape[2]))
    np.add.at(sums, (rows[:, None], cols[None, :]), image)
    counts = np.zeros((grid, grid))
    np.add.at(counts, (rows[:, None], cols[None, :]), 1.0)
    return sums / np.maximum(counts, 1.0)[..., None]


def face_signature(face: np.ndarray, grid: int = DRIFT_GRID) -> np.ndarray:
    """A face crop as grid x grid mean Lab colours: what `face_distance` compares."""
    if min(face.shape[:2]) < grid:  # tiny faces: repeat pixels so that every cell holds some
        k = -(-grid // min(face.shape[:2]))
        face = np.repeat(np.repeat(face, k, axis=0), k, axis=1)
    return srgb_to_lab(grid_average(face, grid))


def face_distance(signature: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean DeltaE76 between two face signatures over the cells where `mask` is true (all cells without one)."""
    delta = np.sqrt(np.sum((signature - reference) ** 2, axis=-1))
    return float(delta.mean() if mask is None else delta[mask].mean())


def cell_mask_outside(face: tuple, hole: tuple, grid: int = DRIFT_GRID) -> np.ndarray:
    """Grid cells of the face box whose centres are outside `hole` (both boxes in the same fractional coordinates)."""
    fx0, fy0, fx1, fy1 = face
    centres = (np.arange(grid) + 0.5) / grid
    xs, ys = fx0 + centres * (fx1 - fx0), fy0 + centres * (fy1 - fy0)
    inside = (ys[:, None] >= hole[1]) & (ys[:, None] <= hole[3]) & (xs[None, :] >= hole[0]) & (xs[None, :] <= hole[2])
    return ~inside


def mean_luma_outside(frame: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean luma of the frame's pixels outside the pixel box (x0, y0, x1, y1)."""
    y = luma(frame)
    x0, y0, x1, y1 = box
    inner = y[y0:y1, x0:x1]
    outside = y.size - inner.size
    return float((y.sum(dtype=np.float64) - inner.sum(dtype=np.float64)) / outside) if outside else float(y.mean())


def frame_difference(frame: np.ndarray, previous: np.ndarray) -> float:
    """Mean absolute difference of two uint8 RGB frames over all pixels and channels (0-255)."""
    return float(np.mean(np.abs(frame.astype(np.int16) - previous.astype(np.int16))))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 RGB frames (peak 255), capped at PSNR_CAP for identical frames."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def masked_psnr(squared_error: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 255, capped at PSNR_CAP) from per-pixel squared errors summed over the 3 channels ([H, W]),
    over the pixels where `mask` is true (all without one)."""
    values = squared_error if mask is None else squared_error[mask]
    mse = float(values.mean(dtype=np.float64)) / 3.0
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * np.log10(255.0**2 / mse))


def masked_delta_e(delta_e: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of per-pixel DeltaE76 values ([H, W]) over the pixels where `mask` is true (all without one)."""
    return float((delta_e if mask is None else delta_e[mask]).mean(dtype=np.float64))


class RegionDistance:
    """Each frame against the portrait over fixed regions: PSNR (RGB) and mean DeltaE76 (CIE Lab) per region.

    `regions` maps a name to an [H, W] boolean mask (None: the whole frame); masks without a pixel are skipped by the
    caller. Calling it with a frame returns {name: (psnr, delta_e)}."""

    def __init__(self, portrait: np.ndarray, regions: dict[str, np.ndarray | None]) -> None:
        self.portrait = np.asarray(portrait, dtype=np.uint8)
        self.portrait_lab = srgb_to_lab(self.portrait)
        self.regions = regions

    def __call__(self, frame: np.ndarray) -> dict[str, tuple[float, float]]:
        difference = frame.astype(np.int32) - self.portrait.astype(np.int32)
        squared = np.einsum("hwc,hwc->hw", difference, difference)
        delta_e = np.sqrt(np.sum((srgb_to_lab(frame) - self.portrait_lab) ** 2, axis=-1))
        return {name: (masked_psnr(squared, mask), masked_delta_e(delta_e, mask))
                for name, mask in self.regions.items()}


def _gaussian_taps(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of a 2-D array (no padding: the result is smaller by len(taps) - 1 each way)."""
    n = len(taps)
    h, w = image.shape
    rows = sum(taps[i] * image[i : h - n + 1 + i] for i in range(n))
    return sum(taps[i] * rows[:, i : w - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma of two RGB frames: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, L 255.

    Frames smaller than the window are compared with one window over the whole frame.
    """
    x, y = luma(a).astype(np.float64), luma(b).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    size = min(11, *x.shape)
    taps = _gaussian_taps(size, 1.5 * size / 11)
    mx, my = _filter_valid(x, taps), _filter_valid(y, taps)
    sxx = _filter_valid(x * x, taps) - mx * mx
    syy = _filter_valid(y * y, taps) - my * my
    sxy = _filter_valid(x * y, taps) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(value.mean())


def loudness_envelope(samples: np.ndarray, sample_rate: int, fps: float, frames: int) -> np.ndarray:
    """RMS of the audio played while each video frame is on screen: frame t gets samples [t/fps, (t+1)/fps).

    Frames past the end of the audio get 0 (silence). Returns float64 [frames].
    """
    samples = np.asarray(samples, dtype=np.float64)
    edges = np.round(np.arange(frames + 1) * sample_rate / fps).astype(np.int64)
    envelope = np.zeros(frames)
    for t in range(frames):
        chunk = samples[min(edges[t], len(samples)) : min(edges[t + 1], len(samples))]
        if chunk.size:
            envelope[t] = np.sqrt(np.mean(chunk**2))
    return envelope


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either series is constant or has fewer than 3 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else float("nan")


def lagged_correlation(mouth: np.ndarray, envelope: np.ndarray, lag: int) -> float:
    """corr(mouth[t], envelope[t - lag]) over the frames where both exist. lag > 0: the mouth moves after the sound."""
    n = min(len(mouth), len(envelope))
    if lag >= 0:
        return pearson(mouth[lag:n], envelope[: n - lag])
    return pearson(mouth[: n + lag], envelope[-lag:n])


@dataclass(frozen=True)
class LipSync:
    correlation: float  # at lag 0
    best_lag: int | None  # frames; > 0 means the mouth follows the audio late (video behind the sound)
    best_correlation: float
    max_lag: int
    correlations: dict[int, float]  # lag -> correlation


def lip_sync(mouth: np.ndarray, envelope: np.ndarray, max_lag: int = 10) -> LipSync:
    """Correlation of mouth openness with the loudness envelope, and the lag in [-max_lag, max_lag] where it peaks.

    Sign: the best lag L maximises corr(mouth[t], envelope[t - L]); L = +2 means the mouth opens two frames after the
    sound (the video is late), L = -2 that it opens two frames early. Ties go to the smaller |L|.
    """
    correlations = {lag: lagged_correlation(mouth, envelope, lag) for lag in range(-max_lag, max_lag + 1)}
    finite = {lag: c for lag, c in correlations.items() if np.isfinite(c)}
    if not finite:
        return LipSync(correlations[0], None, float("nan"), max_lag, correlations)
    best = max(finite, key=lambda lag: (round(finite[lag], 12), -abs(lag)))
    return LipSync(correlations[0], best, finite[best], max_lag, correlations)


def flicker(mean_luma: np.ndarray) -> float:
    """Mean |Y[t+1] - 2 Y[t] + Y[t-1]| of the frames' mean luma (0-255): brightness that jumps back and forth.

    `avatarcli eval` feeds it the mean luma outside the mouth box, so an opening and closing mouth is not flicker.

    Exactly 0 for a still video and for a steady fade; 0 for videos of fewer than 3 frames.
    """
    y = np.asarray(mean_luma, dtype=np.float64)
    if y.size < 3:
        return 0.0
    return float(np.mean(np.abs(y[2:] - 2 * y[1:-1] + y[:-2])))


@dataclass(frozen=True)
class Seams:
    score: float  # mean difference at the window edges / interior mean (NaN without windows or interior)
    overlap_score: float  # mean difference over whole overlaps / interior mean
    per_boundary: list[float]  # each boundary's mean edge difference / interior mean
    worst: float  # the largest of per_boundary
    edges: list[int]  # transition indices t (frame t -> t+1) counted as window edges
    interior_mean: float


def seam_scores(differences: np.ndarray, edges: list[list[int]], spans: list[tuple[int, int]],
                guard: int = 2) -> Seams:
    """Temporal discontinuity at window boundaries relative to the rest of the video.

    `differences[t]` is the difference between frames t and t+1. `edges[k]` are the transitions where boundary k's
    windows begin or end, `spans[k]` = [first, last] transitions of its overlap. Interior transitions are those more
    than `guard` transitions away from every overlap. A video without seams scores about 1; a jump at a boundary
    scores its size over the typical frame-to-frame difference. If the interior does not move at all the ratio is
    infinite for any boundary motion and 1 for none.
    """
    d = np.asarray(differences, dtype=np.float64)
    near = np.zeros(d.size, dtype=bool)
    for first, last in spans:
        near[max(first - guard, 0) : min(last + guard + 1, d.size)] = True
    interior = d[~near]
    flat = [t for group in edges for t in group if 0 <= t < d.size]
    if not flat or interior.size == 0:
        return Seams(float("nan"), float("nan"), [], float("nan"), flat,
                     float(interior.mean()) if interior.size else float("nan"))
    base = float(interior.mean())

    def ratio(value: float) -> float:
        if base > 0:
            return value / base
        return 1.0 if value == 0 else float("inf")

    per_boundary = [ratio(float(d[[t for t in group if 0 <= t < d.size]].mean())) for group in edges
                    if any(0 <= t < d.size for t in group)]
    overlap = np.concatenate([d[max(a, 0) : min(b + 1, d.size)] for a, b in spans])
    return Seams(ratio(float(d[flat].mean())), ratio(float(overlap.mean())), per_boundary, max(per_boundary), flat,
                 base)
