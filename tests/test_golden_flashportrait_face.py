"""Parity of the driving-video front end with the FlashPortrait reference (golden sets, see their READMEs).

`flashportrait_face`: detector pre/post-processing, the 3-iteration landmark refinement, the two-pass tracker with
its One-Euro smoothing, the PD-FGC warp and the FanEncoder -> 554 values per kept frame. The fixture's two stand-in
ONNX files run through the package's own onnxruntime path; the FanEncoder weights are built from the README's recipe
and loaded through the package's weights-only strict loader by their original key names.
`flashportrait`: the face-geometry cases `align.*`.

The fixture root is AVATARCLI_GOLDEN (default: tests/golden). Every size and setting comes from config.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from golden_root import golden_root
import torch
from safetensors.torch import load_file

from avatarcli.errors import CheckpointError
from avatarcli.features.expression import ExpressionExtractor, NoFaceError
from avatarcli.features.face import geometry
from avatarcli.features.face.detector import FaceDetector, decode, preprocess
from avatarcli.features.face.landmarks import LandmarkModel
from avatarcli.features.face.onnx import open_session
from avatarcli.features.face.tracker import TwoPassTracker
from avatarcli.loading.pdfgc import load_fan_encoder
from avatarcli.testing.flashportrait_face import recipe_state_dict

GOLDEN = golden_root()
FACE = GOLDEN / "flashportrait_face"
GEOMETRY = GOLDEN / "flashportrait"
PX = 1e-3  # landmarks and matrices, pixels
FEATURE_RTOL, FEATURE_ATOL = 1e-4, 1e-3
# The whole chain (detector, landmarks, smoothing, warp, encoder), features up to ~40 in size: CPU kernels sum in a
# different order on other machines (seen: 2.7e-3); frames shifted by one pixel move the features by 0.7.
CHAIN_ATOL = 1e-2

pytestmark = pytest.mark.usefixtures("one_thread")


def _numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items() if v.dtype != torch.bfloat16}


@pytest.fixture(scope="module")
def face():
    assert FACE.is_dir(), f"golden fixtures not found at {FACE} (set AVATARCLI_GOLDEN)"
    config = json.loads((FACE / "config.json").read_text())
    return dict(config=config, inputs=_numpy(load_file(FACE / "inputs.safetensors")),
                outputs=_numpy(load_file(FACE / "outputs.safetensors")),
                detector=FaceDetector(open_session(FACE / "face_det.onnx")),
                landmarks=LandmarkModel(open_session(FACE / "face_landmark.onnx")))


@pytest.fixture(scope="module")
def encoder(face, tmp_path_factory):
    """FanEncoder weights from the README recipe, saved as a pickle and read back through the strict loader."""
    config = face["config"]
    state = recipe_state_dict(config["fan_state_dict_keys_sorted"], config["fan_weight_stream_base"])
    path = tmp_path_factory.mktemp("pdfgc") / "pd_fpg.pth"
    torch.save(state, path)
    return load_fan_encoder(path)


def _frame(face, index):
    return face["inputs"]["frames_bgr"][index]


# ------------------------------------------------------------------------------------------------ detector


def test_detector_input_is_the_letterboxed_normalised_frame(face):
    image, matrix = preprocess(_frame(face, 0))
    np.testing.assert_allclose(matrix, face["outputs"]["det.resize_matrix_frame0"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(image, face["outputs"]["det.input_frame0"], rtol=0, atol=1e-5)


def test_detector_raw_outputs_through_onnxruntime(face):
    raw, _ = face["detector"].raw(_frame(face, 0))
    for i, value in enumerate(raw):
        np.testing.assert_allclose(value, face["outputs"][f"det.raw{i}_frame0"], rtol=1e-5, atol=1e-5)


def test_detector_decoding_from_the_reference_raw_outputs(face):
    out = face["outputs"]
    raw = [out[f"det.raw{i}_frame0"] for i in range(6)]
    boxes, scores = decode(raw, out["det.resize_matrix_frame0"], _frame(face, 0).shape[:2])
    np.testing.assert_array_equal(boxes, out["det.boxes_frame0"])
    np.testing.assert_allclose(scores, out["det.scores_frame0"], rtol=1e-6, atol=1e-7)


def test_detector_end_to_end(face):
    boxes, scores = face["detector"](_frame(face, 0))
    np.testing.assert_array_equal(boxes, face["outputs"]["det.boxes_frame0"])
    np.testing.assert_allclose(scores, face["outputs"]["det.scores_frame0"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ landmarks


def test_landmark_refinement_from_the_largest_box(face):
    frame = _frame(face, 0)
    boxes, _ = face["detector"](frame)
    box = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
    found = face["landmarks"].refine(frame, box=box)
    out = face["outputs"]
    np.testing.assert_allclose(found.points, out["align.frame0.pt222"], rtol=0, atol=PX)
    np.testing.assert_allclose(found.crop_matrix, out["align.frame0.M_face"], rtol=0, atol=PX)
    np.testing.assert_allclose(found.euler_rad, out["align.frame0.euler_rad"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(found.prob, out["align.frame0.prob"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ tracker


def _track(face):
    tracker = TwoPassTracker(face["detector"], face["landmarks"])
    kept, rects, points = [], [], []
    for index in range(face["config"]["frames"]):
        result = tracker(_frame(face, index))
        if result.points is not None:
            kept.append(index)
            rects.append(np.asarray(result.rect, dtype=np.float64))
            points.append(result.points)
    return kept, np.array(rects), np.array(points)


def test_tracker_keeps_the_frames_with_a_face(face):
    kept, _, _ = _track(face)
    np.testing.assert_array_equal(kept, face["outputs"]["track.kept_frames"])
    assert face["config"]["blank_frame"] not in kept


def test_tracker_pass1_rectangles_and_pass2_smoothed_landmarks(face):
    _, rects, points = _track(face)
    np.testing.assert_allclose(rects, face["outputs"]["track.stage1_rects"], rtol=0, atol=PX)
    np.testing.assert_allclose(points, face["outputs"]["track.landmarks"], rtol=0, atol=PX)


# ------------------------------------------------------------------------------------------------ PD-FGC


def test_pdfgc_warp_of_the_first_kept_frame(face):
    out = face["outputs"]
    first = int(out["track.kept_frames"][0])
    warped = geometry.pdfgc_warp(_frame(face, first), out["track.landmarks"][0])
    assert warped.shape == out["pdfgc.warped_kept0_bgr"].shape
    # bicubic on uint8: landmarks equal to 1e-3 px may still move a rounding by one level
    assert np.abs(warped.astype(int) - out["pdfgc.warped_kept0_bgr"].astype(int)).max() <= 1


def test_fan_encoder_outputs(face, encoder):
    with torch.no_grad():
        outputs = encoder(torch.from_numpy(face["inputs"]["fan.x"]))
    for name, value in zip(("headpose", "eye", "emo", "mouth"), outputs):
        torch.testing.assert_close(value, torch.from_numpy(face["outputs"][f"fan.{name}"]),
                                   rtol=FEATURE_RTOL, atol=FEATURE_ATOL)


def test_fan_encoder_strict_loader_names_a_missing_key(face, tmp_path):
    config = face["config"]
    state = recipe_state_dict(config["fan_state_dict_keys_sorted"], config["fan_weight_stream_base"])
    dropped = sorted(state)[-1]
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pd_fpg.pth")
    with pytest.raises(CheckpointError, match=r"1 missing: .*" + dropped.replace(".", r"\.")) as error:
        load_fan_encoder(tmp_path / "pd_fpg.pth")
    assert "1 unexpected: extra.weight" in str(error.value)


def test_554_features_per_kept_frame_and_faceless_frames_filled(face, encoder):
    extractor = ExpressionExtractor(face["detector"], face["landmarks"], encoder)
    frames_rgb = (frame[:, :, ::-1] for frame in face["inputs"]["frames_bgr"])
    features = extractor.extract(frames_rgb)
    out = face["outputs"]
    kept = out["track.kept_frames"]
    assert features.shape == (face["config"]["frames"], 554) and features.dtype == torch.float32
    torch.testing.assert_close(features[kept], torch.from_numpy(out["pdfgc.features"]),
                               rtol=FEATURE_RTOL, atol=CHAIN_ATOL)
    blank = face["config"]["blank_frame"]
    if 0 < blank < face["config"]["frames"] - 1:
        torch.testing.assert_close(features[blank], (features[blank - 1] + features[blank + 1]) / 2)


def test_only_faceless_frames_raise_no_face(face, encoder):
    extractor = ExpressionExtractor(face["detector"], face["landmarks"], encoder)
    blank = face["inputs"]["frames_bgr"][face["config"]["blank_frame"]]
    with pytest.raises(NoFaceError, match="no face in drive.mp4"):
        extractor.extract([blank[:, :, ::-1]] * 2, source="drive.mp4")


# ------------------------------------------------------------------------------------------------ align.*


@pytest.fixture(scope="module")
def align():
    assert GEOMETRY.is_dir(), f"golden fixtures not found at {GEOMETRY} (set AVATARCLI_GOLDEN)"
    inputs = _numpy(load_file(GEOMETRY / "inputs.safetensors"))
    outputs = _numpy(load_file(GEOMETRY / "outputs.safetensors"))
    return {k: v for k, v in {**inputs, **outputs}.items() if k.startswith("align.")}


def test_align_crop_from_detector_box(align):
    for box, expected in zip(align["align.bbox"], align["align.M_crop_bbox"]):
        np.testing.assert_allclose(geometry.crop_matrix_from_box(box, 0), expected, rtol=0, atol=1e-10)


def test_align_crop_angle_and_crop_from_landmarks(align):
    cases = len(align["align.M_crop_pts"])
    for points, angle, expected in zip(align["align.landmarks222"][:cases], align["align.crop_angle_deg"],
                                       align["align.M_crop_pts"]):
        assert abs(np.rad2deg(geometry.eye_angle(points)) - angle) < 1e-10
        np.testing.assert_allclose(geometry.crop_matrix_from_points(points, angle), expected, rtol=0, atol=1e-10)


def test_align_pdfgc_similarity_on_ordinary_faces(align):
    # cases 0 and 1 (rotated faces); 2 (mirrored) and 3 (collinear) are the README's flagged degenerate cases
    for points, expected in zip(align["align.landmarks222"][:2], align["align.M_pdfgc"][:2]):
        np.testing.assert_allclose(geometry.pdfgc_matrix(points), expected, rtol=0, atol=1e-10)


def test_align_pdfgc_degenerate_cases_stay_similarities(align):
    # The reference's value depends on the SVD routine's sign convention here, so only the structure is checked:
    # a finite rotation-times-scale (M M^T = s^2 I), as the reference's branches produce.
    for points in align["align.landmarks222"][2:]:
        matrix = geometry.pdfgc_matrix(points)
        assert np.isfinite(matrix).all()
        gram = matrix[:, :2] @ matrix[:, :2].T
        np.testing.assert_allclose(gram, np.eye(2) * gram[0, 0], rtol=0, atol=1e-9 * max(1.0, gram[0, 0]))


def test_align_pdfgc_warp_and_network_input(align):
    warped = geometry.pdfgc_warp(align["align.frame_bgr"], align["align.landmarks222"][1])
    np.testing.assert_array_equal(warped, align["align.warped_case1_bgr"])
    x = geometry.pdfgc_input(np.ascontiguousarray(warped[:, :, ::-1])).astype(np.float64)
    stats = [x.mean(), x.std(ddof=1), x[0, 100, 100], x[2, 50, 150]]
    np.testing.assert_allclose(stats, align["align.pdfgc_input_case1_stats"], rtol=1e-6, atol=1e-7)
