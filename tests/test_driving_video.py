"""The driving video: reading it through the bundled ffmpeg, and its 554 expression values per frame (tiny files)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from golden_root import golden_root
import torch

from avatarcli.errors import AvatarError, CheckpointError
from avatarcli.features.expression import ExpressionExtractor, NoFaceError, fill_missing
from avatarcli.media.audio import ffmpeg_exe
from avatarcli.media.video import iter_video_frames, probe_video
from avatarcli.testing.flashportrait_face import synthetic_driving_frames, write_driving_clip, write_tiny_face_files

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = synthetic_driving_frames(6, height=160, width=192)
    return write_driving_clip(tmp_path_factory.mktemp("clip") / "drive.mp4", frames, fps=25), frames


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    folder = write_tiny_face_files(tmp_path_factory.mktemp("weights") / "FlashPortrait")
    return ExpressionExtractor.from_folder(folder)


# ------------------------------------------------------------------------------------------------ reading


def test_probe_reports_size_fps_frames_and_no_audio(clip):
    info = probe_video(clip[0])
    assert (info.width, info.height, info.fps, info.frame_count, info.has_audio) == (192, 160, 25.0, 6, False)


def test_the_frame_count_does_not_depend_on_ffmpegs_stats_line(clip, tmp_path, monkeypatch):
    """ffmpeg 7.0 (imageio-ffmpeg 0.7) prints no "frame=" in the stats line of a stream copy: an ffmpeg that strips it
    from every stderr line still gives the right count."""
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(f"#!/bin/sh\nexec 3>&1\n'{ffmpeg_exe()}' \"$@\" 2>&1 1>&3 3>&- | sed 's/frame= *[0-9]*//' >&2\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))
    from avatarcli.media import audio
    assert audio.ffmpeg_exe() == str(wrapper)
    assert probe_video(clip[0]).frame_count == 6


def test_probe_sees_an_audio_track_and_an_ntsc_rate(tmp_path):
    path = write_driving_clip(tmp_path / "talk.mp4", synthetic_driving_frames(5, 64, 64), fps=30000 / 1001,
                              with_audio=True)
    info = probe_video(path)
    assert info.has_audio and abs(info.fps - 30000 / 1001) < 1e-9 and info.frame_count == 5


def test_a_phone_video_with_rotation_metadata_is_read_upright(clip, tmp_path):
    rotated = tmp_path / "portrait_phone.mp4"
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-display_rotation:v:0", "90",
                    "-i", str(clip[0]), "-c", "copy", str(rotated)], check=True)
    info = probe_video(rotated)
    assert (info.width, info.height, info.frame_count) == (160, 192, 6)
    frames = list(iter_video_frames(rotated, info))
    assert len(frames) == 6 and frames[0].shape == (192, 160, 3)


def test_frames_stream_out_as_rgb_uint8_in_order(clip):
    path, frames = clip
    decoded = list(iter_video_frames(path))
    assert len(decoded) == len(frames)
    assert all(f.shape == (160, 192, 3) and f.dtype == np.uint8 and f.flags.writeable for f in decoded)
    # lossy but close: the face colour survives encoding
    assert np.abs(decoded[2].astype(int) - frames[2].astype(int)).mean() < 4


def test_stopping_early_ends_the_decoder(clip):
    frames = iter_video_frames(clip[0])
    first = next(frames)
    frames.close()
    assert first.shape == (160, 192, 3)


def test_a_file_with_only_audio_is_an_error_naming_it(tmp_path):
    path = tmp_path / "speech.wav"
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=0.2",
                    str(path)], check=True)
    with pytest.raises(AvatarError, match=r"speech\.wav: it has no video stream"):
        probe_video(path)


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video")
    with pytest.raises(AvatarError, match=r"broken\.mp4"):
        probe_video(path)


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(AvatarError, match=r"not found: .*nope\.mp4"):
        probe_video(tmp_path / "nope.mp4")


# ------------------------------------------------------------------------------------------------ features


def test_every_frame_gets_554_values(extractor, clip):
    features = extractor.extract_video(clip[0])
    assert features.shape == (6, 554) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[3])  # the face moves, so do its features


def test_faceless_frames_keep_the_frame_count_and_are_filled_from_neighbours(extractor, tmp_path):
    frames = synthetic_driving_frames(7, 160, 192, faceless=(0, 3, 4))
    features = extractor.extract(frames)
    assert features.shape == (7, 554)
    torch.testing.assert_close(features[0], features[1])  # held before the first face
    torch.testing.assert_close(features[3], features[2] + (features[5] - features[2]) / 3)
    torch.testing.assert_close(features[4], features[2] + 2 * (features[5] - features[2]) / 3)


def test_a_video_without_any_face_is_an_error_naming_it(extractor, tmp_path):
    path = write_driving_clip(tmp_path / "empty_room.mp4", synthetic_driving_frames(3, 64, 64, faceless=(0, 1, 2)))
    with pytest.raises(NoFaceError, match=r"no face in .*empty_room\.mp4"):
        extractor.extract_video(path)


def test_fill_missing_interpolates_and_holds_the_ends():
    values = np.array([[0.0], [0.0], [2.0], [0.0], [8.0], [0.0]])
    found = np.array([False, False, True, False, True, False])
    np.testing.assert_allclose(fill_missing(values, found)[:, 0], [2, 2, 2, 5, 8, 8])


def test_a_missing_face_model_is_an_error_naming_it(tmp_path):
    folder = write_tiny_face_files(tmp_path / "FlashPortrait")
    (folder / "face_landmark.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"face_landmark\.onnx"):
        ExpressionExtractor.from_folder(folder)


def test_a_corrupt_face_model_is_an_error_naming_it(tmp_path):
    folder = write_tiny_face_files(tmp_path / "FlashPortrait")
    (folder / "face_det.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(CheckpointError, match=r"face_det\.onnx"):
        ExpressionExtractor.from_folder(folder)


def test_tiny_face_files_have_the_published_layout(tmp_path):
    """Same tensor ranks and shapes as the golden set's stand-ins (which mirror the published files), and the
    published FanEncoder key names, readable weights-only."""
    import json

    import onnxruntime

    golden = golden_root() / "flashportrait_face"
    folder = write_tiny_face_files(tmp_path / "FlashPortrait")
    for name in ("face_det.onnx", "face_landmark.onnx"):
        ours = onnxruntime.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        theirs = onnxruntime.InferenceSession(str(golden / name), providers=["CPUExecutionProvider"])
        for get in ("get_inputs", "get_outputs"):
            assert [t.shape for t in getattr(ours, get)()] == [t.shape for t in getattr(theirs, get)()]
    keys = json.loads((golden / "config.json").read_text())["fan_state_dict_keys_sorted"]
    state = torch.load(folder / "pd_fpg.pth", weights_only=True)
    assert sorted(state) == sorted(keys)


def test_smoothing_still_landmarks_keeps_them_finite_and_unchanged():
    """The reference divides 0 by 0 when a region does not move at all; the filter's limit is the point itself."""
    from avatarcli.features.face.tracker import LandmarkSmoother

    smoother = LandmarkSmoother()
    points = (np.random.default_rng(0).random((222, 2)) * 200).astype(np.float32)
    for _ in range(3):
        smoothed = smoother(points.copy(), 150.0)
    np.testing.assert_array_equal(smoothed, points)
    moved = smoother(points + 1.0, 150.0)
    assert np.isfinite(moved).all() and np.all((moved > points) & (moved <= points + 1.0))
