"""FlashPortrait's expression features: a driving video -> 554 values per frame (PD-FGC on tracked, aligned faces).

    extractor = ExpressionExtractor.from_folder(Path("weights/FlashPortrait"), device="cuda")
    features = extractor.extract_video("driving.mp4")  # [frames, 554] float32

Per frame: face detection and 222 landmarks with the reference's two-pass tracker (both passes run in lockstep, so
frames stream through once), the PD-FGC alignment warp of the frame onto a 224 x 224 template, and PD-FGC's
FanEncoder -> cat[headpose 6, eye 6, emo 30, mouth 512]. Unlike the reference, which drops frames without a face
(and so shifts every later expression in time), a faceless frame keeps its place: its features are interpolated
linearly between the nearest frames with a face (held at the ends), so the output has one row per input frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from avatarcli.errors import AvatarError
from avatarcli.features.face.detector import FaceDetector
from avatarcli.features.face.geometry import pdfgc_input, pdfgc_warp
from avatarcli.features.face.landmarks import LandmarkModel
from avatarcli.features.face.onnx import open_session
from avatarcli.features.face.tracker import TwoPassTracker
from avatarcli.models.pdfgc import FEATURE_DIM, FanEncoder

# File names in FrancisRing/FlashPortrait (all at the repository root).
DETECTOR_FILE = "face_det.onnx"
LANDMARK_FILE = "face_landmark.onnx"
PDFGC_FILE = "pd_fpg.pth"

BATCH = 16  # aligned faces per FanEncoder call


class NoFaceError(AvatarError):
    """No frame of the driving video shows a face the tracker accepts."""


def fill_missing(features: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Rows where `found` is False, interpolated linearly between the nearest found rows (held at the ends)."""
    found_idx = np.flatnonzero(found)
    if found_idx.size == 0:
        raise ValueError("no row to fill from")
    frames = np.arange(len(features))
    filled = features.copy()
    for column in range(features.shape[1]):
        filled[:, column] = np.interp(frames, found_idx, features[found_idx, column])
    return filled


class ExpressionExtractor:
    """Driving frames -> [N, 554] PD-FGC expression features, one row per frame."""

    def __init__(self, detector: FaceDetector, landmarks: LandmarkModel, encoder: FanEncoder,
                 device: str | torch.device = "cpu"):
        self.detector = detector
        self.landmarks = landmarks
        self.encoder = encoder.eval()
        self.device = torch.device(device)

    @classmethod
    def from_folder(cls, flashportrait_dir: Path, device: str = "cpu") -> "ExpressionExtractor":
        """Load face_det.onnx, face_landmark.onnx (ONNX Runtime, CUDA provider when available and asked for) and
        pd_fpg.pth (weights-only, strict keys) from a FrancisRing/FlashPortrait folder."""
        from avatarcli.loading.pdfgc import load_fan_encoder

        folder = Path(flashportrait_dir)
        detector = FaceDetector(open_session(folder / DETECTOR_FILE, device))
        landmarks = LandmarkModel(open_session(folder / LANDMARK_FILE, device))
        encoder = load_fan_encoder(folder / PDFGC_FILE, device=device)
        return cls(detector, landmarks, encoder, device)

    @torch.no_grad()
    def _encode(self, crops: list[np.ndarray]) -> np.ndarray:
        batch = torch.from_numpy(np.stack([pdfgc_input(crop) for crop in crops]))
        dtype = next(self.encoder.parameters()).dtype
        return self.encoder.features(batch.to(self.device, dtype)).float().cpu().numpy()

    def extract(self, frames: Iterable[np.ndarray], *, source: str | Path | None = None,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """[N, 554] float32 for N frames (HxWx3 uint8 RGB, any iterable; consumed once, one frame in memory).

        Raises NoFaceError (an AvatarError, naming `source` when given) when no frame has a face.
        """
        tracker = TwoPassTracker(self.detector, self.landmarks)
        rows: list[np.ndarray | None] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            for (index, _), row in zip(pending, self._encode([crop for _, crop in pending])):
                rows[index] = row
            pending.clear()

        for count, frame in enumerate(frames, start=1):
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise AvatarError(f"driving frames must be HxWx3 uint8 RGB, got {frame.shape} {frame.dtype}")
            # the face networks were trained on OpenCV's BGR; the PD-FGC crop is RGB (warping is per channel)
            found = tracker(np.ascontiguousarray(frame[:, :, ::-1]))
            rows.append(None)
            if found.points is not None:
                pending.append((len(rows) - 1, pdfgc_warp(np.ascontiguousarray(frame), found.points)))
                if len(pending) == BATCH:
                    flush()
            if progress is not None:
                progress(count)
        if pending:
            flush()

        found_mask = np.array([row is not None for row in rows], dtype=bool)
        if not found_mask.any():
            where = f" in {source}" if source is not None else ""
            what = f"no frames{where}" if not rows else f"no face{where} (checked {len(rows)} frames)"
            raise NoFaceError(f"{what}; the driving video must show one face, large enough (>= 96 px) and lit")
        features = np.zeros((len(rows), FEATURE_DIM), dtype=np.float32)
        for index, row in enumerate(rows):
            if row is not None:
                features[index] = row
        return torch.from_numpy(fill_missing(features, found_mask).astype(np.float32))

    def extract_video(self, path: str | Path, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Features of every frame of a video file, decoded through the bundled ffmpeg as it goes."""
        from avatarcli.media.video import iter_video_frames, probe_video

        info = probe_video(path)
        return self.extract(iter_video_frames(path, info), source=path, progress=progress)
