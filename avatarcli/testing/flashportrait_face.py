"""Tiny stand-ins for FlashPortrait's face files, in the published layout, plus a synthetic face to find.

    write_tiny_face_files(Path("tiny/FlashPortrait"))
    # -> face_det.onnx, face_landmark.onnx, pd_fpg.pth

The ONNX files have the published tensor ranks, shapes and output order (the code reads tensor names from the
session, as the reference does, so names are not part of the contract). The detector scores every cell by its
brightness (strides 8/16/32: 3 score maps [1, N, 1], then 3 box-bin maps [1, N, 32]) and predicts a box of about
6 strides (192 input pixels), so it finds the bright face of `synthetic_face_frame` and nothing on a dark frame.
The landmark network returns a fixed face-like layout of 222 points (plus a small input-dependent offset),
pitch/yaw near 0 and a probability that is ~1 on a lit crop and below 1e-4 on a dark one. pd_fpg.pth holds a
FanEncoder with the published key names at a narrow trunk width, readable weights-only. The values are random: the
features mean nothing, but every code path runs as with the published files.

The tracker drops faces whose landmarks span less than 96 px (the reference's rule), so driving clips for tests
need frames of about 128 px or more; `synthetic_driving_frames` defaults to 192 x 192.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

DETECTOR_INPUT = (1, 3, 272, 160)
LANDMARK_INPUT = (1, 3, 128, 128)
TINY_FAN_WIDTH = 8


# ---------------------------------------------------------------------------------------------- landmarks layout


def face_layout() -> np.ndarray:
    """[222, 2] points in [0, 1] crop coordinates: contour, nose, brows, eyes, mouth and pupils where a face has them.

    The points PD-FGC aligns on (pupils 182/202, nose tip 36, mouth corners 149/133) sit near its template, and the
    outer eye corners 74/96 are level, so a crop around them is upright.
    """
    pts = np.zeros((222, 2))

    def arc(start, count, cx, cy, rx, ry, a0, a1):
        angles = np.linspace(a0, a1, count)
        pts[start:start + count] = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)

    arc(0, 33, 0.5, 0.42, 0.34, 0.42, np.pi, 0.0)  # contour: ear to chin to ear (y grows downwards)
    pts[0:33, 1] = 0.42 + np.abs(pts[0:33, 1] - 0.42)
    arc(33, 15, 0.5, 0.34, 0.05, 0.1, -np.pi / 2, np.pi / 2)  # nose bridge to tip
    pts[36] = (0.503, 0.4185)
    arc(48, 13, 0.34, 0.2, 0.1, 0.03, np.pi, 2 * np.pi)  # left brow
    arc(61, 13, 0.64, 0.2, 0.1, 0.03, np.pi, 2 * np.pi)  # right brow
    arc(74, 22, 0.3843, 0.27, 0.07, 0.025, np.pi, 3 * np.pi)  # left eye, starting at its outer corner
    arc(96, 22, 0.62, 0.27, 0.07, 0.025, 0.0, 2 * np.pi)  # right eye, starting at its outer corner
    pts[96, 1] = pts[74, 1]
    arc(118, 64, 0.502, 0.526, 0.096, 0.035, 0.0, 2 * np.pi)  # lips
    pts[149], pts[133] = (0.406, 0.5273), (0.5977, 0.525)
    arc(182, 20, 0.3843, 0.27, 0.018, 0.018, 0.0, 2 * np.pi)  # left pupil ring
    arc(202, 20, 0.62, 0.2668, 0.018, 0.018, 0.0, 2 * np.pi)  # right pupil ring
    pts[182], pts[202] = (0.3843, 0.27), (0.62, 0.2668)
    # Centre the layout's box and give its longer side 85% of the crop: the crop the tracker cuts around these
    # points (15% margin) then reproduces them, so the face keeps its size from frame to frame.
    low, high = pts.min(axis=0), pts.max(axis=0)
    return (pts - (low + high) / 2) * (0.85 / (high - low).max()) + 0.5


def synthetic_face_frame(height: int = 192, width: int = 192, shift: tuple[float, float] = (0.0, 0.0),
                         mouth_open: float = 0.3) -> np.ndarray:
    """An RGB uint8 frame: a lit oval face with dark eyes and mouth on a dark background (what the tiny
    detector finds). `shift` moves the face by a fraction of the frame; `mouth_open` in [0, 1]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cx, cy = width * (0.5 + shift[0]), height * (0.5 + shift[1])
    rx, ry = 0.36 * width, 0.44 * height
    frame = np.full((height, width, 3), 16.0)
    face = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    frame[face] = (224, 190, 170)
    for ex in (-0.35, 0.35):
        eye = ((xx - cx - ex * rx) / (0.12 * rx)) ** 2 + ((yy - cy + 0.25 * ry) / (0.07 * ry)) ** 2 <= 1
        frame[eye] = (40, 30, 30)
    mouth = ((xx - cx) / (0.3 * rx)) ** 2 + ((yy - cy - 0.4 * ry) / ((0.03 + 0.12 * mouth_open) * ry)) ** 2 <= 1
    frame[mouth] = (90, 20, 30)
    return frame.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- ONNX graphs


def _detector_graph(rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    score_nodes, box_nodes = [], []
    inits.append(numpy_helper.from_array(np.array([1, -1, 1], dtype=np.int64), "score_shape"))
    inits.append(numpy_helper.from_array(np.array([1, -1, 32], dtype=np.int64), "box_shape"))
    # box bins: every side peaks at 3 strides -> a box of about 6 strides around the cell
    bins = np.full((4, 8), -4.0, dtype=np.float32)
    bins[:, 3] = 6.0
    for stride in (8, 16, 32):
        n = int(np.ceil(272 / stride) * np.ceil(160 / stride))
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", ["input"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride], ceil_mode=1))
        # only the coarsest stride fires: score = sigmoid(4 * mean normalised brightness - 2)
        gain, bias = (4.0 / 3, -2.0) if stride == 32 else (0.0, -20.0)
        inits.append(numpy_helper.from_array(np.full((1, 3, 1, 1), gain, dtype=np.float32), f"sw{stride}"))
        inits.append(numpy_helper.from_array(np.array([bias], dtype=np.float32), f"sb{stride}"))
        weight = (0.01 * rng.standard_normal((32, 3, 1, 1))).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"bw{stride}"))
        inits.append(numpy_helper.from_array(bins.reshape(-1), f"bb{stride}"))
        nodes += [
            helper.make_node("Conv", [pooled, f"sw{stride}", f"sb{stride}"], [f"sl{stride}"]),
            helper.make_node("Sigmoid", [f"sl{stride}"], [f"sg{stride}"]),
            helper.make_node("Transpose", [f"sg{stride}"], [f"st{stride}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"st{stride}", "score_shape"], [f"score_{stride}"]),
            helper.make_node("Conv", [pooled, f"bw{stride}", f"bb{stride}"], [f"bl{stride}"]),
            helper.make_node("Transpose", [f"bl{stride}"], [f"bt{stride}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"bt{stride}", "box_shape"], [f"boxes_{stride}"]),
        ]
        score_nodes.append(helper.make_tensor_value_info(f"score_{stride}", TensorProto.FLOAT, [1, n, 1]))
        box_nodes.append(helper.make_tensor_value_info(f"boxes_{stride}", TensorProto.FLOAT, [1, n, 32]))
    outputs = score_nodes + box_nodes
    graph = helper.make_graph(nodes, "tiny_face_det",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(DETECTOR_INPUT))],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _landmark_graph(rng: np.random.Generator):
    from onnx import TensorProto, helper, numpy_helper

    layout = face_layout()
    features = 3 * 4 * 4  # 32 x 32 average pools of the 128 x 128 crop
    offset = (0.002 * rng.standard_normal((features, 444))).astype(np.float32)
    base = np.concatenate([layout[:, 0], layout[:, 1]]).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
        numpy_helper.from_array(offset, "wl"),
        numpy_helper.from_array(base, "bl"),
        numpy_helper.from_array((0.01 * rng.standard_normal((features, 2))).astype(np.float32), "we"),
        numpy_helper.from_array(np.zeros(2, dtype=np.float32), "be"),
        # prob = sigmoid(40 * (mean brightness - 0.3)): ~1 on a lit face, < 1e-4 on a dark crop
        numpy_helper.from_array(np.full((features, 1), 40.0 / features, dtype=np.float32), "wp"),
        numpy_helper.from_array(np.array([8.0], dtype=np.float32), "bp"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Sub", ["flat", "half"], ["centred"]),
        helper.make_node("Gemm", ["centred", "wl", "bl"], ["landmark"]),
        helper.make_node("Gemm", ["centred", "we", "be"], ["euler"]),
        helper.make_node("Gemm", ["centred", "wp", "bp"], ["prob_logit"]),
        helper.make_node("Sigmoid", ["prob_logit"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_face_landmark",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(LANDMARK_INPUT))],
        [helper.make_tensor_value_info("landmark", TensorProto.FLOAT, [1, 444]),
         helper.make_tensor_value_info("euler", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


# ---------------------------------------------------------------------------------------------- PD-FGC weights


def tiny_fan_state_dict(seed: int = 0, width: int = TINY_FAN_WIDTH) -> dict[str, torch.Tensor]:
    """A FanEncoder state dict with the published key names (narrow trunk), random but well-scaled."""
    from avatarcli.models.pdfgc import FanEncoder

    generator = torch.Generator().manual_seed(seed)
    model = FanEncoder(width=width)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith("running_mean") or key.endswith("bias"):
            state[key] = 0.1 * torch.randn(value.shape, generator=generator)
        elif value.ndim == 1:  # BatchNorm scale
            state[key] = 1 + 0.1 * torch.randn(value.shape, generator=generator)
        else:
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=generator) / fan_in ** 0.5
    return state


_MASK64 = (1 << 64) - 1


def splitmix_uniform(stream: int, count: int) -> np.ndarray:
    """count uniforms in [0, 1): splitmix64 of z = (stream << 32) + i (the golden set's weight recipe)."""
    with np.errstate(over="ignore"):
        z = np.uint64((stream << 32) & _MASK64) + np.arange(count, dtype=np.uint64)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def recipe_state_dict(shapes: dict[str, list[int]], stream_base: int) -> dict[str, torch.Tensor]:
    """FanEncoder weights from the flashportrait_face golden set's recipe (its README), by original key name."""
    keys = sorted(shapes)
    has_running_var = {key.rsplit(".", 1)[0] for key in keys if key.endswith(".running_var")}
    state = {}
    for j, key in enumerate(keys):
        shape = tuple(shapes[key])
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
            continue
        u = splitmix_uniform(stream_base + j, int(np.prod(shape, dtype=np.int64))).reshape(shape)
        s = 2 * u - 1
        module, name = key.rsplit(".", 1)
        if name == "running_var":
            value = 0.5 + u
        elif name == "running_mean" or name == "bias":
            value = 0.1 * s
        elif name == "weight" and module in has_running_var:
            value = 1 + 0.1 * s
        else:
            value = s * np.sqrt(3.0 / np.prod(shape[1:]))
        state[key] = torch.from_numpy(np.asarray(value, dtype=np.float64).astype(np.float32))
    return state


# ---------------------------------------------------------------------------------------------- the folder


def write_tiny_face_files(flashportrait_dir: Path, seed: int = 0) -> Path:
    """Write face_det.onnx, face_landmark.onnx and pd_fpg.pth (tiny, random) into a FlashPortrait folder."""
    import onnx

    folder = Path(flashportrait_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    onnx.save(_detector_graph(rng), str(folder / "face_det.onnx"))
    onnx.save(_landmark_graph(rng), str(folder / "face_landmark.onnx"))
    torch.save(tiny_fan_state_dict(seed), folder / "pd_fpg.pth")
    return folder


# ---------------------------------------------------------------------------------------------- driving clips


def synthetic_driving_frames(count: int, height: int = 192, width: int = 192,
                             faceless: tuple[int, ...] = ()) -> list[np.ndarray]:
    """`count` RGB frames of the synthetic face moving and talking; the frames listed in `faceless` are dark."""
    frames = []
    for i in range(count):
        if i in faceless:
            frames.append(np.full((height, width, 3), 8, dtype=np.uint8))
        else:
            phase = 2 * np.pi * i / max(count, 8)
            frames.append(synthetic_face_frame(height, width, shift=(0.03 * np.sin(phase), 0.02 * np.cos(phase)),
                                               mouth_open=0.5 + 0.5 * np.sin(2 * phase)))
    return frames


def write_driving_clip(path: Path, frames: list[np.ndarray], fps: float = 25.0, with_audio: bool = False) -> Path:
    """Encode RGB frames (and optionally a sine tone) as an H.264 mp4 with the bundled ffmpeg."""
    import subprocess

    from avatarcli.media.audio import ffmpeg_exe

    height, width = frames[0].shape[:2]
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0"]
    if with_audio:
        command += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={len(frames) / fps:.3f}",
                    "-c:a", "aac", "-shortest"]
    command += ["-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(command, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)
    return Path(path)
