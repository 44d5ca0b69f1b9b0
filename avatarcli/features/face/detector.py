"""The face detector (face_det.onnx): a NanoDet/GFL-style single-class detector on a 160 x 272 letterboxed input.

Pre- and post-processing follow the reference exactly: keep-ratio letterbox through a 3x3 matrix, BGR mean/std
normalisation, per stride (8, 16, 32) a softmax over the 8 distance bins of each box side (reg_max 7), the top 1000
cells by score, score > 0.4, hard NMS at IoU 0.3 over the 200 best, and the boxes mapped back through the inverse
letterbox, clipped to the frame and truncated to integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from avatarcli.features.face.geometry import letterbox_matrix

INPUT_HW = (272, 160)
STRIDES = (8, 16, 32)
REG_MAX = 7
MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)


@dataclass(frozen=True)
class DetectorSettings:
    prob_threshold: float = 0.4
    iou_threshold: float = 0.3
    num_candidates: int = 1000  # best cells kept per stride
    nms_candidates: int = 200  # best boxes NMS looks at


def preprocess(frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(network input [1, 3, 272, 160] float32, the 3x3 letterbox matrix)."""
    height, width = INPUT_HW
    matrix = letterbox_matrix((frame_bgr.shape[1], frame_bgr.shape[0]), (width, height))
    resized = cv2.warpPerspective(frame_bgr, matrix, dsize=(width, height))
    mean = np.array(MEAN_BGR, dtype=np.float32).reshape(1, 1, 3) / 255
    std = np.array(STD_BGR, dtype=np.float32).reshape(1, 1, 3) / 255
    image = (resized.astype(np.float32) / 255 - mean) / std
    return image.transpose(2, 0, 1)[None], matrix


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - np.amax(x, axis=1, keepdims=True))
    return shifted / np.sum(shifted, axis=1, keepdims=True)


def _area(left_top: np.ndarray, right_bottom: np.ndarray) -> np.ndarray:
    wh = np.clip(right_bottom - left_top, 0.0, None)
    return wh[..., 0] * wh[..., 1]


def _iou(boxes: np.ndarray, box: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    overlap = _area(np.maximum(boxes[..., :2], box[..., :2]), np.minimum(boxes[..., 2:], box[..., 2:]))
    return overlap / (_area(boxes[..., :2], boxes[..., 2:]) + _area(box[..., :2], box[..., 2:]) - overlap + eps)


def hard_nms(box_scores: np.ndarray, iou_threshold: float, candidates: int) -> np.ndarray:
    """Greedy NMS on [N, 5] (x1, y1, x2, y2, score): repeatedly keep the best and drop boxes overlapping it."""
    order = np.argsort(box_scores[:, -1])[-candidates:]
    picked = []
    while len(order) > 0:
        best = order[-1]
        picked.append(best)
        if len(order) == 1:
            break
        order = order[:-1]
        order = order[_iou(box_scores[order, :4], box_scores[best, :4][None]) <= iou_threshold]
    return box_scores[picked]


def unletterbox_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Map boxes from the network input back to the frame (all four corners, then their bounds), clipped."""
    n = len(boxes)
    corners = np.ones((n * 4, 3))
    corners[:, :2] = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    corners = corners @ np.linalg.inv(matrix).T
    corners = (corners[:, :2] / corners[:, 2:3]).reshape(n, 8)
    xs, ys = corners[:, [0, 2, 4, 6]], corners[:, [1, 3, 5, 7]]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out.astype(np.float32)


def decode(outputs: list[np.ndarray], matrix: np.ndarray, frame_hw: tuple[int, int],
           settings: DetectorSettings = DetectorSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [n, 4] int32 (frame pixels) and scores [n] from the six raw outputs (3 score maps, 3 box maps)."""
    scores_per_stride = [np.squeeze(x).reshape(-1, 1) for x in outputs[:3]]
    bins_per_stride = [np.squeeze(x) for x in outputs[3:6]]
    boxes, scores = [], []
    for stride, bins, score in zip(STRIDES, bins_per_stride, scores_per_stride):
        rows, cols = np.meshgrid(np.arange(INPUT_HW[0] / stride), np.arange(INPUT_HW[1] / stride), indexing="ij")
        x, y = cols.flatten() * stride, rows.flatten() * stride
        centres = np.stack((x, y, x, y), axis=1)
        # expected distance per side = sum_k k * softmax(bins)_k, in strides
        distance = _softmax(bins.reshape(-1, REG_MAX + 1)) * np.arange(REG_MAX + 1)[None]
        distance = np.sum(distance, axis=1).reshape(-1, 4) * stride
        best = np.argsort(score.max(axis=1))[::-1][: settings.num_candidates]
        boxes.append(centres[best] + np.array([-1, -1, 1, 1]) * distance[best])
        scores.append(score[best])
    boxes_all = np.concatenate(boxes, axis=0)
    probs = np.concatenate(scores, axis=0)[:, 0]
    keep = probs > settings.prob_threshold
    if not keep.any():
        return np.zeros((0, 4), dtype=np.int32), np.zeros((0,), dtype=np.float64)
    picked = hard_nms(np.concatenate([boxes_all[keep], probs[keep].reshape(-1, 1)], axis=1),
                      settings.iou_threshold, settings.nms_candidates)
    picked[:, :4] = unletterbox_boxes(picked[:, :4], matrix, frame_hw[1], frame_hw[0])
    return picked[:, :4].astype(np.int32), picked[:, 4]


class FaceDetector:
    """face_det.onnx behind the reference's pre/post-processing. Call with a BGR uint8 frame."""

    def __init__(self, session, settings: DetectorSettings = DetectorSettings()):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.settings = settings

    def raw(self, frame_bgr: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        image, matrix = preprocess(frame_bgr)
        return self.session.run(None, {self.input_name: image}), matrix

    def __call__(self, frame_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, matrix = self.raw(frame_bgr)
        return decode(outputs, matrix, frame_bgr.shape[:2], self.settings)
