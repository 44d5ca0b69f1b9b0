"""The 222-point landmark network (face_landmark.onnx) and the reference's 3-iteration crop refinement.

The network sees a 128 x 128 BGR crop scaled to [0, 1] and returns 222 points normalised to the crop (all x, then
all y), pitch and yaw in radians, and a face probability. The first crop comes from a face box (or the previous
frame's landmarks while tracking); each further iteration re-crops around the landmarks just found, rotated upright
by the eye-corner angle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from avatarcli.features.face.geometry import (
    LANDMARK_CROP, crop_matrix_from_box, crop_matrix_from_points, eye_angle, transform_points,
)

ITERATIONS = 3


@dataclass
class Landmarks:
    points: np.ndarray  # [222, 2] float32, frame pixels
    euler_rad: np.ndarray  # [3] float32: pitch, yaw (network), roll (eye corners)
    prob: np.ndarray  # [1] float32
    crop_matrix: np.ndarray  # 2x3 float64, the last crop


class LandmarkModel:
    """face_landmark.onnx with its crop conventions. Frames are BGR uint8."""

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [output.name for output in session.get_outputs()]

    def run_crop(self, crop_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(points in crop pixels [222, 2], euler (pitch, yaw, roll) radians, prob [1]) for one 128 x 128 crop."""
        image = crop_bgr.transpose((2, 0, 1)).astype(np.float32)[np.newaxis] / 255.0
        landmark, euler, prob = self.session.run(self.output_names, {self.input_name: image})
        points = np.reshape(landmark[0], (2, -1)).transpose((1, 0)) * LANDMARK_CROP
        roll = eye_angle(points)
        return points, np.array([euler[0, 0], euler[0, 1], roll], dtype=np.float32), prob[0]

    def _pass(self, frame_bgr: np.ndarray, matrix: np.ndarray):
        crop = cv2.warpAffine(frame_bgr, matrix, (LANDMARK_CROP, LANDMARK_CROP))
        points, euler, prob = self.run_crop(crop)
        return transform_points(points, matrix, invert=True), euler, prob

    def refine(self, frame_bgr: np.ndarray, box=None, previous: np.ndarray | None = None,
               iterations: int = ITERATIONS) -> Landmarks:
        """Landmarks from a face box (x_min, y_min, x_max, y_max) or from the previous frame's landmarks."""
        if previous is not None:
            matrix = crop_matrix_from_points(previous, np.rad2deg(eye_angle(previous)))
        else:
            matrix = crop_matrix_from_box(box, 0)
        points, euler, prob = self._pass(frame_bgr, matrix)
        for _ in range(iterations - 1):
            matrix = crop_matrix_from_points(points, np.rad2deg(euler[2]))
            points, euler, prob = self._pass(frame_bgr, matrix)
        return Landmarks(points=points, euler_rad=euler, prob=prob, crop_matrix=matrix)
