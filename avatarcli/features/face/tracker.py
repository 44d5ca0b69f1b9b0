"""Face tracking across frames with One-Euro landmark smoothing, and the reference's two-pass landmark sequence.

Per frame the tracker refines every face it already follows from its previous landmarks, adds every new detector
box as a candidate, refines each candidate (3 iterations), drops candidates with prob < 1e-4 or a landmark box
under 96 px, and of two candidates overlapping with IoU > 0.12 drops the smaller. The largest remaining face is the
frame's face.

The reference runs the tracker twice over the clip: pass 1 finds a face rectangle per frame (frames without a face
are dropped); pass 2 restarts tracking over the kept frames and seeds it with the pass-1 rectangle whenever it
follows nothing. Pass 2 on frame k needs only pass 1's result for frame k, so `TwoPassTracker` runs both passes in
lockstep over a single stream of frames, with the same result and without holding the video in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from avatarcli.features.face.geometry import eye_angle
from avatarcli.features.face.landmarks import LandmarkModel

MIN_PROB = 0.0001
MIN_FACE_PX = 96
DUPLICATE_IOU = 0.12

# Landmark regions smoothed by one filter each: (points, points measuring the motion, still threshold,
# still fcmin/beta, fast fcmin/beta). Motion is the mean displacement over the face size; under the still threshold
# the filter gets stiffer in proportion, between it and 0.02 it loosens linearly, above 0.02 it is at its loosest.
_REGIONS = (
    (range(0, 33), range(9, 24), 0.005, 0.05, 0.3),  # face contour, measured on its lower part
    (range(33, 48), range(33, 48), 0.003, 0.03, 0.7),  # nose
    (range(48, 74), range(48, 74), 0.003, 0.02, 0.5),  # eyebrows
    (range(74, 96), range(74, 96), 0.003, 0.03, 0.7),  # left eye
    (range(96, 118), range(96, 118), 0.003, 0.03, 0.7),  # right eye
    (range(118, 182), range(118, 182), 0.003, 0.05, 0.7),  # mouth
    (range(182, 202), range(182, 202), 0.003, 0.03, 0.7),  # left pupil
    (range(202, 222), range(202, 222), 0.003, 0.03, 0.7),  # right pupil
)
_FAST_MOTION = 0.02


def _alpha(t_e, cutoff):
    r = 2 * math.pi * cutoff * t_e
    return r / (r + 1)


class OneEuroFilter:
    """One-Euro filter (Casiez et al. 2012) as the reference uses it: the time step t_e doubles as the stiffness
    knob (`fcmin`), min_cutoff 1, derivative cutoff 1, and the adaptive cutoff is per coordinate."""

    def __init__(self, d_cutoff: float = 1.0):
        self.d_cutoff = d_cutoff
        self.dx_prev = 0.0

    def __call__(self, x, x_prev, fcmin, min_cutoff=1.0, beta=0.0):
        if fcmin <= 0:
            # Points that did not move at all: the reference divides 0 by 0 here and poisons the filter with NaN;
            # the limit of the filter is the unchanged point.
            return x
        a_d = _alpha(fcmin, self.d_cutoff)
        dx = (x - x_prev) / fcmin
        dx_hat = a_d * dx + (1 - a_d) * self.dx_prev
        a = _alpha(fcmin, min_cutoff + beta * abs(dx_hat))
        self.dx_prev = dx_hat
        return a * x + (1 - a) * x_prev


class LandmarkSmoother:
    """One filter per landmark region, its stiffness set by how far the region moved since the last frame."""

    def __init__(self):
        self.filters = [OneEuroFilter() for _ in _REGIONS]
        self.previous: np.ndarray | None = None

    def __call__(self, points: np.ndarray, face_size) -> np.ndarray:
        if self.previous is None:
            self.previous = points.copy()
            return points
        moved = np.sqrt(np.square(points[:, 0] - self.previous[:, 0])
                        + np.square(points[:, 1] - self.previous[:, 1])) / face_size
        smooth = points.copy()
        for filt, (idx, measured, still, slow, fast) in zip(self.filters, _REGIONS):
            idx, motion = list(idx), np.mean(moved[list(measured)])
            if motion < still:
                knob = slow * (motion / still)
            elif motion < _FAST_MOTION:
                knob = slow + (fast - slow) * ((motion - still) / (_FAST_MOTION - still))
            else:
                knob = fast
            smooth[idx] = filt(points[idx], self.previous[idx], fcmin=knob, beta=knob)
        self.previous = smooth
        return smooth


@dataclass
class TrackedFace:
    rect: object  # (x_min, y_min, x_max, y_max): a detector box at first, then the landmarks' bounds
    face_size: object
    points: np.ndarray | None = None
    euler_rad: np.ndarray | None = None
    prob: object = 0.0
    smoother: LandmarkSmoother = field(default_factory=LandmarkSmoother)

    @classmethod
    def from_box(cls, box) -> "TrackedFace":
        return cls(rect=box, face_size=np.sqrt(np.square(box[2] - box[0]) + np.square(box[3] - box[1])))


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = abs(max(x1 - x0, 0) * max(y1 - y0, 0))
    if inter == 0:
        return 0
    area_a = abs((a[2] - a[0]) * (a[3] - a[1]))
    area_b = abs((b[2] - b[0]) * (b[3] - b[1]))
    return inter / float(area_a + area_b - inter)


def _area(rect):
    return (rect[3] - rect[1]) * (rect[2] - rect[0])


def largest(faces: list[TrackedFace]) -> TrackedFace:
    """The face with the largest rectangle (the last of equals, as a stable sort's last element)."""
    return sorted(faces, key=lambda face: _area(face.rect))[-1]


class FaceTracker:
    """Follows faces from frame to frame; `step` returns the faces present in a BGR frame."""

    def __init__(self, detector, landmarks: LandmarkModel):
        self.detector = detector
        self.landmarks = landmarks
        self.faces: list[TrackedFace] = []

    def reset(self) -> None:
        self.faces = []

    def step(self, frame_bgr: np.ndarray, seed_box=None) -> list[TrackedFace]:
        """Track one frame. `seed_box` replaces detection while nothing is being followed."""
        if not self.faces and seed_box is not None:
            boxes = [seed_box]
        else:
            boxes = self.detector(frame_bgr)[0]
        self.faces.extend(TrackedFace.from_box(box) for box in boxes)

        dropped: list[int] = []
        for i, face in enumerate(self.faces):
            if face.points is not None:
                found = self.landmarks.refine(frame_bgr, previous=face.points)
            else:
                found = self.landmarks.refine(frame_bgr, box=face.rect)
            if found.prob < MIN_PROB:
                dropped.append(i)
                continue
            points = face.smoother(found.points, face.face_size)
            face.points = points
            x_min, x_max = np.min(points[:, 0]), np.max(points[:, 0])
            y_min, y_max = np.min(points[:, 1]), np.max(points[:, 1])
            if x_max - x_min < MIN_FACE_PX or y_max - y_min < MIN_FACE_PX:
                dropped.append(i)
            # the face size the smoother normalises motion by grows with the head's turn away from the camera
            pitch, yaw = np.rad2deg(found.euler_rad[0]), np.rad2deg(found.euler_rad[1])
            face.face_size = np.linalg.norm(points[0] - points[32]) * (1.0 + (abs(pitch) + abs(yaw) * 0.6) / 18.0)
            face.rect = [x_min, y_min, x_max, y_max]
            face.euler_rad = found.euler_rad
            face.prob = found.prob

        if len(self.faces) > 1:
            for i, face in enumerate(self.faces):
                if i in dropped:
                    continue
                for j, other in enumerate(self.faces):
                    if j in dropped or i == j:
                        continue
                    if _iou(face.rect, other.rect) > DUPLICATE_IOU:
                        smaller = i if _area(face.rect) - _area(other.rect) < 0 else j
                        if smaller not in dropped:
                            dropped.append(smaller)
        self.faces = [face for i, face in enumerate(self.faces) if i not in dropped]
        return self.faces


@dataclass
class TrackResult:
    """One frame's outcome of the two passes: pass-1 rectangle and pass-2 landmarks (None where no face)."""

    rect: list | None
    points: np.ndarray | None


class TwoPassTracker:
    """The reference's `det_landmarks`, streamed: feed frames in order, get each frame's final landmarks."""

    def __init__(self, detector, landmarks: LandmarkModel):
        self.first = FaceTracker(detector, landmarks)
        self.second = FaceTracker(detector, landmarks)

    def __call__(self, frame_bgr: np.ndarray) -> TrackResult:
        faces = self.first.step(frame_bgr)
        if not faces:
            return TrackResult(rect=None, points=None)
        rect = largest(faces).rect
        faces = self.second.step(frame_bgr, seed_box=rect)
        if not faces:
            return TrackResult(rect=rect, points=None)
        return TrackResult(rect=rect, points=largest(faces).points)
