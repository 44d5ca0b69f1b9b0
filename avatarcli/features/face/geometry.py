"""Face geometry: crop matrices, point transforms and the PD-FGC alignment warp.

All matrices are OpenCV-style 2x3 affine maps from frame pixels to crop pixels (float64). Rotation angles are in
degrees, counter-clockwise in image coordinates, about the box centre (cv2.getRotationMatrix2D), as in the reference.
"""

from __future__ import annotations

import cv2
import numpy as np

LANDMARK_CROP = 128
CROP_EXPAND = 0.15  # the landmark crop leaves 15% margin around the face box
EYE_CORNERS = (74, 96)  # outer corners of the left and right eye in the 222-point layout

# PD-FGC alignment: pupils (182, 202), nose tip (36), mouth corners (149, 133) onto a template in a 224 x 224 crop.
PDFGC_SIZE = 224
PDFGC_POINTS = (182, 202, 36, 149, 133)
PDFGC_TEMPLATE = np.array([[0.3843, 0.27], [0.62, 0.2668], [0.503, 0.4185], [0.406, 0.5273], [0.5977, 0.525]])


def letterbox_matrix(src_wh: tuple[int, int], dst_wh: tuple[int, int]) -> np.ndarray:
    """3x3 keep-ratio resize of a src_wh image into the centre of dst_wh (the detector's input transform)."""
    src_w, src_h = src_wh
    dst_w, dst_h = dst_wh
    ratio = dst_h / src_h if src_w / src_h < dst_w / dst_h else dst_w / src_w
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -src_w / 2, -src_h / 2
    scale = np.diag([ratio, ratio, 1.0])
    shift = np.eye(3)
    shift[0, 2], shift[1, 2] = 0.5 * dst_w, 0.5 * dst_h
    return shift @ scale @ centre


def transform_points(points: np.ndarray, matrix: np.ndarray, invert: bool = False) -> np.ndarray:
    """Apply a 2x3 affine map (or its inverse) to [N, 2] points; float32 points stay float32, as with cv2."""
    if invert:
        matrix = cv2.invertAffineTransform(matrix)
    return cv2.transform(np.expand_dims(points, axis=1), matrix)[:, 0, :]


def eye_angle(points: np.ndarray) -> np.ndarray:
    """In-plane roll (radians) from the two outer eye corners; the 1e-8 keeps a vertical pair finite."""
    left, right = points[EYE_CORNERS[0]], points[EYE_CORNERS[1]]
    return np.arctan2(right[1] - left[1], right[0] - left[0] + 0.00000001)


def crop_matrix_from_box(box, angle_deg: float = 0.0, size: int = LANDMARK_CROP,
                         expand_ratio: float = CROP_EXPAND) -> np.ndarray:
    """Square crop around a face box (x_min, y_min, x_max, y_max): longer side -> size * (1 - expand_ratio)."""
    x_min, y_min, x_max, y_max = box
    cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
    scale = size / max(x_max - x_min, y_max - y_min) * (1 - expand_ratio)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle=angle_deg, scale=scale)
    matrix[:, 2] += [size / 2 - cx, size / 2 - cy]
    return matrix


def _bounds(points: np.ndarray):
    return np.min(points[:, 0]), np.min(points[:, 1]), np.max(points[:, 0]), np.max(points[:, 1])


def crop_matrix_from_points(points: np.ndarray, angle_deg: float, size: int = LANDMARK_CROP,
                            expand_ratio: float = CROP_EXPAND) -> np.ndarray:
    """Re-crop around previous landmarks: rotate by angle about their box centre, scale the rotated extent to
    size * (1 - expand_ratio), and centre the rotated, scaled points' box in the crop."""
    x_min, y_min, x_max, y_max = _bounds(points)
    cx, cy = (x_min + x_max) / 2, (y_min + y_max) / 2
    upright = transform_points(points, cv2.getRotationMatrix2D((cx, cy), angle=angle_deg, scale=1.0))
    ux_min, uy_min, ux_max, uy_max = _bounds(upright)
    scale = size / max(ux_max - ux_min, uy_max - uy_min) * (1 - expand_ratio)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle=angle_deg, scale=scale)
    sx_min, sy_min, sx_max, sy_max = _bounds(transform_points(points, matrix))
    matrix[:, 2] += [size / 2 - (sx_min + sx_max) / 2, size / 2 - (sy_min + sy_max) / 2]
    return matrix


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, translation) taking src points onto dst points.

    Umeyama (PAMI 1991, eqs. 38-43), computed the way the reference computes it: numpy's SVD returns A = U S Vh,
    and the full-rank branch uses U D Vh^T where the paper has U D Vh. The two agree for ordinary faces (det A > 0,
    where numpy's 2x2 Vh is symmetric) and differ for mirrored point sets; the rank-deficient branch (collinear
    points) follows the paper with Vh. Matching the reference keeps PD-FGC's inputs identical to training.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    signs = np.ones(dim)
    if np.linalg.det(cov) < 0:
        signs[-1] = -1
    u, s, vh = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        return np.full((2, 3), np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vh) > 0:
            rotation = u @ vh
        else:
            flip = signs.copy()
            flip[-1] = -1
            rotation = u @ np.diag(flip) @ vh
    else:
        rotation = u @ np.diag(signs) @ vh.T
    scale = (s @ signs) / src_c.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * (rotation @ src_mean)
    return matrix


def pdfgc_matrix(landmarks: np.ndarray, size: int = PDFGC_SIZE) -> np.ndarray:
    """The PD-FGC alignment: similarity taking the five landmarks onto the template scaled to size."""
    return umeyama_similarity(np.asarray(landmarks)[list(PDFGC_POINTS)], PDFGC_TEMPLATE * size)


def pdfgc_warp(image: np.ndarray, landmarks: np.ndarray, size: int = PDFGC_SIZE) -> np.ndarray:
    """The aligned size x size face crop (bicubic, zero border), same channel order as `image`."""
    return cv2.warpAffine(image, pdfgc_matrix(landmarks, size), (size, size), flags=cv2.INTER_CUBIC)


def pdfgc_input(crop_rgb: np.ndarray) -> np.ndarray:
    """PD-FGC's network input from an aligned RGB uint8 crop: CHW float32 in [-1, 1] (x / 255 * 2 - 1)."""
    return (crop_rgb / 255.0 * 2 - 1).transpose(2, 0, 1).astype(np.float32)
