"""`evaluate`: one pass over a generated video (and optionally a second one) -> per-frame curves and the metrics.

The video streams through ffmpeg one frame at a time, so memory does not grow with its length. Window boundaries
come from the sampler's own window plan (avatarcli/sampling/windows.py) for the video's frame count: 21 latent
frames per window (81 video frames) and the `balanced` preset's overlap unless told otherwise. Latent frame l >= 1
decodes to video frames 4l-3 .. 4l (latent 0 to frame 0), so the edge between latent frames l-1 and l is the
transition from video frame 4l-4 to 4l-3.

Identity against the portrait by region: every frame is compared with the portrait (resized to the video's size) over
fixed pixel regions, PSNR and DeltaE76 per frame (metrics.RegionDistance), then averaged over the first and the last
REGION_SPAN of the frames (at least one frame each) and over all of them. Regions: `frame` (every pixel), `face` (the
portrait's face box, the mouth box left out) and, on demo-world videos (layout demo), `hair`, `skin`, `shirt` and
`background` (layout.demo_part_masks). Elsewhere those four are not measured: None, null in the JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarcli.errors import AvatarError
from avatarcli.eval import layout as lay
from avatarcli.eval import metrics as m
from avatarcli.eval.video import VideoReader

WINDOW_LATENT_FRAMES = 21  # StableAvatar's 81-frame windows
DEFAULT_OVERLAP = 8  # latent frames: the balanced preset's overlap (presets/balanced.yaml)
REGION_SPAN = 0.1  # identity by region: start and end are the means over the first and the last 10% of the frames
REGIONS = ("frame", "face") + lay.DEMO_PARTS  # in this order in the report


@dataclass(frozen=True)
class EvalJob:
    video: Path
    reference: Path
    audio: Path | None = None  # None: the video's own audio track, when it has one
    compare: Path | None = None
    layout: str = "auto"  # auto, demo or detect
    face_box: tuple[float, float, float, float] | None = None  # fractions; overrides the layout's face box
    window_frames: int = WINDOW_LATENT_FRAMES  # latent frames per window
    overlap: int = DEFAULT_OVERLAP  # latent frames shared by neighbouring windows
    max_lag: int = 10  # frames searched either way for the lip-sync lag
    span_seconds: float = 5.0  # drift is also reported over the first and the last this many seconds
    detect_every: int = 5  # real videos: run the face detector on every n-th frame (the box is held in between)


@dataclass(frozen=True)
class Boundary:
    index: int  # the window that starts here (1, 2, ...)
    start_frame: int  # first video frame of the overlap
    end_frame: int  # first video frame after the overlap (the previous window's last frame + 1)
    edges: list[int]  # transitions t (frame t -> t+1) where the new window begins and the old one ends
    span: tuple[int, int]  # first and last transition of the overlap


@dataclass(frozen=True)
class RegionCurve:
    """One region against the portrait: PSNR (dB, capped at metrics.PSNR_CAP) and mean DeltaE76 per frame."""

    pixels: int
    psnr: np.ndarray
    delta_e: np.ndarray


def region_span(frames: int) -> int:
    """Frames averaged for a region's start and end values: REGION_SPAN of the video, at least 1."""
    return max(1, math.ceil(REGION_SPAN * frames))


@dataclass
class EvalReport:
    video: Path
    width: int
    height: int
    fps: float
    frames: int
    layout: str
    windows: list[tuple[int, int]]  # [first, end) video frames of each window, clipped to the video
    boundaries: list[Boundary]
    mouth: np.ndarray  # openness per frame
    drift: np.ndarray  # face distance from the reference per frame (DeltaE76)
    differences: np.ndarray  # |frame[t+1] - frame[t]| per transition
    mean_luma: np.ndarray  # of each frame outside the mouth box (what flicker is computed from)
    envelope: np.ndarray | None  # audio RMS per frame, None without audio
    lip_sync: m.LipSync | None
    seams: m.Seams
    flicker: float
    drift_per_window: list[float]
    drift_start: float
    drift_end: float
    psnr: np.ndarray | None = None
    ssim: np.ndarray | None = None
    compare_frames: int | None = None
    compare_mouth: np.ndarray | None = None  # the comparison video's mouth openness, same boxes
    mouth_sync: m.LipSync | None = None  # this video's mouth against the comparison's (lag > 0: this one is late)
    regions: dict[str, RegionCurve | None] = field(default_factory=dict)  # REGIONS; None: not measured
    notes: list[str] = field(default_factory=list)

    @property
    def region_span(self) -> int:
        return region_span(self.frames)

    def region_summary(self) -> dict[str, Any]:
        """The identity-by-region numbers: start / end over the first and last `span_frames` frames, and the mean."""
        span = self.region_span
        out: dict[str, Any] = {"span_frames": span, "regions": {}}
        for name in REGIONS:
            curve = self.regions.get(name)
            if curve is None:
                out["regions"][name] = None
                continue
            out["regions"][name] = {"pixels": curve.pixels}
            for key, values in (("psnr", curve.psnr), ("delta_e", curve.delta_e)):
                out["regions"][name].update({
                    f"{key}_start": _num(float(values[:span].mean())), f"{key}_end": _num(float(values[-span:].mean())),
                    f"{key}_mean": _num(float(values.mean()))})
        return out

    def summary(self) -> dict[str, Any]:
        """All numbers as plain JSON-able values (NaN -> None, infinity -> None with a note)."""
        ls = self.lip_sync
        result: dict[str, Any] = {
            "video": str(self.video), "frames": self.frames, "fps": self.fps, "size": f"{self.width}x{self.height}",
            "layout": self.layout, "windows": len(self.windows),
            "boundaries": [b.start_frame for b in self.boundaries],
            "lip_sync": None if ls is None else {
                "correlation": _num(ls.correlation), "best_lag": ls.best_lag,
                "best_correlation": _num(ls.best_correlation), "max_lag": ls.max_lag,
            },
            "drift": {
                "mean": _num(float(self.drift.mean())) if self.frames else None,
                "start": _num(self.drift_start), "end": _num(self.drift_end),
                "end_over_start": _num(self.drift_end / self.drift_start) if self.drift_start > 0 else None,
                "per_window": [_num(v) for v in self.drift_per_window],
            },
            "seams": {
                "score": _num(self.seams.score), "overlap_score": _num(self.seams.overlap_score),
                "worst": _num(self.seams.worst), "per_boundary": [_num(v) for v in self.seams.per_boundary],
                "interior_difference": _num(self.seams.interior_mean),
            },
            "flicker": _num(self.flicker),
            "mouth_openness_mean": _num(float(self.mouth.mean())) if self.frames else None,
            "portrait": self.region_summary(),
        }
        if self.psnr is not None:
            result["compare"] = {
                "frames": self.compare_frames, "compared": int(len(self.psnr)),
                "psnr_mean": _num(float(self.psnr.mean())), "psnr_min": _num(float(self.psnr.min())),
                "ssim_mean": _num(float(self.ssim.mean())), "ssim_min": _num(float(self.ssim.min())),
                "mouth_correlation": _num(self.mouth_sync.correlation),
                "mouth_best_lag": self.mouth_sync.best_lag,
                "mouth_best_correlation": _num(self.mouth_sync.best_correlation),
            }
        if self.notes:
            result["notes"] = list(self.notes)
        return result


def _num(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def window_boundaries(frames: int, window_frames: int = WINDOW_LATENT_FRAMES,
                      overlap: int = DEFAULT_OVERLAP) -> tuple[list[tuple[int, int]], list[Boundary]]:
    """The sampler's window plan for a video of `frames` frames, in video frames."""
    from avatarcli.sampling.windows import latent_frames_for, plan_windows

    try:
        plan = plan_windows(latent_frames_for(frames), window_frames, overlap)
    except ValueError as error:
        raise AvatarError(str(error)) from error

    def first_frame(latent: int) -> int:
        return 0 if latent == 0 else 4 * latent - 3

    windows = [(first_frame(w.start), min(4 * (w.end - 1) + 1, frames)) for w in plan.windows]
    boundaries = []
    for previous, window in zip(plan.windows, plan.windows[1:]):
        begin, end = 4 * window.start - 4, 4 * previous.end - 4  # transitions across those latent edges
        if begin >= frames - 1:
            break
        boundaries.append(Boundary(window.index, first_frame(window.start), first_frame(previous.end),
                                   [t for t in (begin, end) if t < frames - 1], (begin, min(end, frames - 2))))
    windows = [(a, b) for a, b in windows if a < frames]
    return windows, boundaries


class _Regions:
    """Face/mouth regions per frame: fixed (demo layout or --face-box) or tracked with the face detector."""

    def __init__(self, job: EvalJob, layout: str, reference: np.ndarray) -> None:
        self.layout, self.every = layout, max(1, job.detect_every)
        self.detector = None
        if job.face_box is not None:
            self.fixed: lay.Box | None = job.face_box
            self.reference = lay.detected_regions(job.face_box, reference)
        elif layout == "demo":
            self.fixed = None
            self.reference = lay.demo_regions()
        else:
            self.fixed = None
            self.detector = lay.FaceDetector()
            box = self.detector(reference)
            if box is None:
                raise AvatarError(
                    f"no face found in the reference image {job.reference}; give --face-box x0,y0,x1,y1 "
                    "(fractions), or --layout demo for demo-world videos")
            self.reference = lay.detected_regions(box, reference)
        self.current = self.reference
        self.detections = self.misses = 0

    def for_frame(self, index: int, frame: np.ndarray) -> lay.Regions:
        if self.layout == "demo" and self.fixed is None:
            return self.reference
        if self.fixed is not None:
            return lay.detected_regions(self.fixed, frame)
        if index % self.every == 0:
            box = self.detector(frame)
            if box is None:
                self.misses += 1
            else:
                self.detections += 1
                if _moved(self.current.face, box):
                    self.current = lay.detected_regions(box, frame)
        return self.current


def _region_masks(layout: str, portrait: lay.Regions, width: int, height: int,
                  notes: list[str]) -> dict[str, np.ndarray | None]:
    """The fixed regions measured against the portrait (see the module's docstring), None for the whole frame; those
    not measured are left out. `portrait` holds the portrait's face and mouth boxes (the demo layout's, --face-box's,
    or the detector's on the portrait)."""
    masks: dict[str, np.ndarray | None] = {"frame": None}
    face_mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = lay.pixel_box(portrait.face, width, height)
    face_mask[y0:y1, x0:x1] = True
    x0, y0, x1, y1 = lay.pixel_box(portrait.mouth, width, height)
    face_mask[y0:y1, x0:x1] = False
    masks["face"] = face_mask
    if layout == "demo":
        masks.update(lay.demo_part_masks(width, height))
    else:
        notes.append(f"{', '.join(lay.DEMO_PARTS)} against the portrait are measured only on demo-world videos "
                     "(--layout demo); not measured here")
    empty = [name for name, mask in masks.items() if mask is not None and not mask.any()]
    for name in empty:
        del masks[name]
    if empty:
        notes.append(f"{', '.join(empty)}: no pixels at {width}x{height}, not measured against the portrait")
    return masks


def _moved(old: lay.Box, new: lay.Box, tolerance: float = 0.1) -> bool:
    """Whether a detected face box moved by more than `tolerance` of the face's size (else it is detector jitter,
    and keeping the old box keeps a still face at exactly the reference's crop)."""
    width, height = old[2] - old[0], old[3] - old[1]
    return any(abs(a - b) > tolerance * size for a, b, size in zip(old, new, (width, height, width, height)))


def _reference_frame(path: Path, width: int, height: int) -> np.ndarray:
    """The portrait as the generator saw it: resized (not cropped) to the video's size, bicubic."""
    from PIL import Image

    from avatarcli.media.image import load_portrait

    image = load_portrait(path).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _audio(job: EvalJob, notes: list[str]) -> np.ndarray | None:
    from avatarcli.media.audio import SAMPLE_RATE, load_audio

    if job.audio is not None:
        return load_audio(job.audio, SAMPLE_RATE)
    try:
        return load_audio(job.video, SAMPLE_RATE)
    except AvatarError:
        notes.append("no audio: the video has no audio track and --audio was not given, so lip sync is not measured")
        return None


def _check(job: EvalJob) -> None:
    if job.max_lag < 0:
        raise AvatarError(f"--max-lag must be >= 0, got {job.max_lag}")
    if job.span_seconds <= 0:
        raise AvatarError(f"--span-seconds must be > 0, got {job.span_seconds}")
    window_boundaries(1, job.window_frames, job.overlap)  # a bad window or overlap fails before any reading


def evaluate(job: EvalJob) -> EvalReport:
    """Measure `job.video` (see avatarcli/eval/metrics.py for each metric). Raises AvatarError on bad input."""
    _check(job)
    reader = VideoReader(job.video)
    info = reader.info
    other = None
    notes: list[str] = []
    try:
        samples = _audio(job, notes)
        if job.compare is not None:
            other = VideoReader(job.compare, what="comparison video")
            if (other.info.width, other.info.height) != (info.width, info.height):
                raise AvatarError(
                    f"cannot compare {job.video} ({info.width}x{info.height}) with {job.compare} "
                    f"({other.info.width}x{other.info.height}): the sizes differ")
        return _measure(job, iter(reader), info.width, info.height, info.fps,
                        iter(other) if other is not None else None, samples, notes)
    finally:
        reader.close()
        if other is not None:
            other.close()


def evaluate_frames(job: EvalJob, frames: np.ndarray, fps: float, compare: np.ndarray | None = None,
                    samples: np.ndarray | None = None) -> EvalReport:
    """The same measurements on frames held in memory (uint8 [T, H, W, 3]), e.g. straight from a generation:
    `compare` takes the place of `job.compare`, `samples` (16 kHz mono) of the audio file; `job.video`, `job.audio`
    and `job.compare` are not read (job.reference is)."""
    _check(job)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise AvatarError(f"frames must be [T, H, W, 3], got shape {tuple(frames.shape)}")
    height, width = frames.shape[1:3]
    if compare is not None and tuple(compare.shape[1:3]) != (height, width):
        raise AvatarError(f"cannot compare {width}x{height} frames with {compare.shape[2]}x{compare.shape[1]} ones")
    notes: list[str] = []
    if samples is None:
        notes.append("no audio given, so lip sync is not measured")
    return _measure(job, iter(frames), width, height, float(fps), iter(compare) if compare is not None else None,
                    samples, notes)


def _measure(job: EvalJob, frames, width: int, height: int, fps: float, other_frames, samples, notes) -> EvalReport:
    from avatarcli.media.audio import SAMPLE_RATE

    reference = _reference_frame(job.reference, width, height)
    layout = lay.resolve_layout(job.layout, width, height)
    regions = _Regions(job, layout, reference)
    reference_signature = m.face_signature(lay.crop(reference, regions.reference.face))
    portrait_distance = m.RegionDistance(reference, _region_masks(layout, regions.reference, width, height, notes))
    by_region: list[dict[str, tuple[float, float]]] = []

    mouth, drift, differences, mean_luma, psnr, ssim, other_mouth = [], [], [], [], [], [], []
    previous = None
    for index, frame in enumerate(frames):
        r = regions.for_frame(index, frame)
        by_region.append(portrait_distance(frame))
        mouth.append(m.mouth_openness(lay.crop(frame, r.mouth), r.dark_luma))
        mask = m.cell_mask_outside(r.face, r.mouth)
        drift.append(m.face_distance(m.face_signature(lay.crop(frame, r.face)), reference_signature, mask))
        mean_luma.append(m.mean_luma_outside(frame, lay.pixel_box(r.mouth, width, height)))
        if previous is not None:
            differences.append(m.frame_difference(frame, previous))
        previous = frame
        if other_frames is not None:
            second = next(other_frames, None)
            if second is not None:
                psnr.append(m.psnr(frame, second))
                ssim.append(m.ssim(frame, second))
                other_mouth.append(m.mouth_openness(lay.crop(second, r.mouth), r.dark_luma))
    compare_frames = None
    if other_frames is not None:
        compare_frames = len(psnr) + sum(1 for _ in other_frames)

    frames = len(mouth)
    if frames == 0:
        raise AvatarError(f"video {job.video} has no frames")
    if regions.detector is not None and regions.detections == 0:
        notes.append("the face detector found no face in the video; the reference's face box was used throughout")
    if compare_frames is not None and compare_frames != frames:
        notes.append(f"the videos differ in length ({frames} vs {compare_frames} frames); "
                     f"the first {min(frames, compare_frames)} were compared")
    if compare_frames == 0:
        raise AvatarError(f"comparison video {job.compare} has no frames")
    compared = other_frames is not None

    mouth_a, drift_a = np.array(mouth), np.array(drift)
    differences_a, luma_a = np.array(differences), np.array(mean_luma)
    envelope = lip = None
    if samples is not None:
        envelope = m.loudness_envelope(samples, SAMPLE_RATE, fps, frames)
        lip = m.lip_sync(mouth_a, envelope, job.max_lag)
        if not np.isfinite(lip.correlation):
            notes.append("lip sync undefined: the mouth or the audio loudness does not change")

    windows, boundaries = window_boundaries(frames, job.window_frames, job.overlap)
    seams = m.seam_scores(differences_a, [b.edges for b in boundaries], [b.span for b in boundaries])
    span = max(1, int(round(job.span_seconds * fps)))
    curves: dict[str, RegionCurve | None] = dict.fromkeys(REGIONS)
    for name, mask in portrait_distance.regions.items():
        values = np.array([frame_values[name] for frame_values in by_region])
        curves[name] = RegionCurve(height * width if mask is None else int(mask.sum()), values[:, 0], values[:, 1])
    return EvalReport(
        video=job.video, width=width, height=height, fps=fps, frames=frames, layout=layout,
        windows=windows, boundaries=boundaries, mouth=mouth_a, drift=drift_a, differences=differences_a,
        mean_luma=luma_a, envelope=envelope, lip_sync=lip, seams=seams, flicker=m.flicker(luma_a),
        drift_per_window=[float(drift_a[a:b].mean()) for a, b in windows],
        drift_start=float(drift_a[:span].mean()), drift_end=float(drift_a[-span:].mean()),
        psnr=np.array(psnr) if compared else None, ssim=np.array(ssim) if compared else None,
        compare_frames=compare_frames, notes=notes,
        compare_mouth=np.array(other_mouth) if compared else None,
        mouth_sync=m.lip_sync(mouth_a[: len(other_mouth)], np.array(other_mouth), job.max_lag) if compared else None,
        regions=curves,
    )
