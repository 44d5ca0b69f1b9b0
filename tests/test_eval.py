"""`avatarcli eval` on constructed videos with known answers: a tiny numpy renderer of demo-layout faces, written
losslessly (H.264 crf 0) through avatarcli's own mp4 sink, then measured through the library and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarcli.cli import main
from avatarcli.errors import AvatarError
from avatarcli.eval import EvalJob, evaluate, window_boundaries
from avatarcli.eval import layout as lay
from avatarcli.eval import metrics as m
from avatarcli.media.audio import SAMPLE_RATE, write_wav
from avatarcli.sink.ffmpeg import Mp4Sink

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FPS = 25
SIZE = 128
SKIN = np.array([224, 182, 150], dtype=np.float64)
BACKGROUND = np.array([60, 90, 140], dtype=np.float64)

# Small windows keep the clips short: 5 latent frames = 17 video frames, overlap 2 -> a boundary every 12 frames.
SMALL = dict(window_frames=5, overlap=2)


def syllables(frames: int, seed: int = 0) -> np.ndarray:
    """A loudness envelope in [0, 1] per frame: random syllables (rise, hold, fall) with pauses."""
    rng = np.random.default_rng(seed)
    env = np.zeros(frames)
    t = 2
    while t < frames:
        length = min(int(rng.integers(3, 9)), frames - t)
        peak = rng.uniform(0.4, 1.0)
        env[t : t + length] = peak * np.sin(np.linspace(0, np.pi, length + 2)[1:-1])
        t += length + int(rng.integers(1, 5))
    return env


def speech_for(envelope: np.ndarray, path: Path) -> Path:
    """A 200 Hz tone whose amplitude is the envelope, frame by frame (40 ms = 8 whole periods per frame)."""
    per_frame = SAMPLE_RATE // FPS
    t = np.arange(per_frame * len(envelope)) / SAMPLE_RATE
    write_wav(path, 0.8 * np.repeat(envelope, per_frame) * np.sin(2 * np.pi * 200 * t))
    return path


def render(frames: int, mouth: np.ndarray | None = None, skin_shift: np.ndarray | None = None,
           brightness: np.ndarray | None = None, scroll: bool = True) -> np.ndarray:
    """Demo-layout frames: striped background (scrolling one pixel per frame: steady motion), a skin ellipse
    inside FACE_BOX, two dark eyes above MOUTH_BOX, and a black mouth inside MOUTH_BOX whose height follows `mouth`."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    fx0, fy0, fx1, fy1 = (np.array(lay.FACE_BOX) * SIZE)
    rx, ry = (fx1 - fx0) / 2 - 2, (fy1 - fy0) / 2 - 2
    face = ((x - (fx0 + fx1) / 2) / rx) ** 2 + ((y - (fy0 + fy1) / 2) / ry) ** 2 <= 1
    mx0, my0, mx1, my1 = lay.pixel_box(lay.MOUTH_BOX, SIZE, SIZE)
    video = np.empty((frames, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(frames):
        stripes = 30 * np.sin(2 * np.pi * (x + (t if scroll else 0)) / 16)[..., None]
        image = BACKGROUND + stripes
        skin = SKIN + (0 if skin_shift is None else skin_shift[t])
        image = np.where(face[..., None], skin, image)
        for cx in (48, 80):
            image[(x - cx) ** 2 + (y - 56) ** 2 <= 16] = (30, 30, 30)
        if mouth is not None:
            height = int(round(mouth[t] * (my1 - my0 - 4)))
            image[my0 + 2 : my0 + 2 + height, mx0 + 4 : mx1 - 4] = 0
        if brightness is not None:
            image = image + brightness[t]
        video[t] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return video


def write(video: np.ndarray, path: Path, audio: Path | None = None) -> Path:
    with Mp4Sink(path, SIZE, SIZE, FPS, audio_path=audio, crf=0, preset="ultrafast") as sink:
        sink.write(video)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "face.png"
    Image.fromarray(render(1, scroll=False)[0]).save(path)
    return path


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    """60 frames whose mouth follows the audio's loudness 3 frames late; the audio is muxed into the mp4."""
    folder = tmp_path_factory.mktemp("talk")
    env = syllables(60)
    audio = speech_for(env, folder / "speech.wav")
    lagged = np.concatenate([np.zeros(3), env[:-3]])
    return write(render(60, mouth=lagged, scroll=False), folder / "talk.mp4", audio), audio, env


# ---- lip sync -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lag", [0, 3, -2])
def test_mouth_that_follows_the_envelope_with_a_known_lag_gives_that_lag(tmp_path, reference, lag):
    env = syllables(60, seed=1)
    mouth = np.zeros_like(env)  # mouth[t] = env[t - lag]
    if lag >= 0:
        mouth[lag:] = env[: len(env) - lag]
    else:
        mouth[:lag] = env[-lag:]
    audio = speech_for(env, tmp_path / "a.wav")
    video = write(render(60, mouth=mouth), tmp_path / "v.mp4")
    report = evaluate(EvalJob(video, reference, audio=audio, **SMALL))
    assert report.layout == "demo"
    assert report.lip_sync.best_lag == lag
    assert report.lip_sync.best_correlation > 0.97
    if lag != 0:
        assert report.lip_sync.correlation < report.lip_sync.best_correlation - 0.2


def test_lip_sync_reads_the_videos_own_audio_track(talking, reference):
    video, _, _ = talking
    report = evaluate(EvalJob(video, reference, **SMALL))
    assert report.lip_sync.best_lag == 3 and report.lip_sync.best_correlation > 0.97


def test_demo_layout_is_the_demo_worlds_contract():
    assert lay.DEMO_SIZE == (128, 128) and lay.DEMO_FPS == 25 and lay.DARK_LUMA == 40.0
    assert lay.FACE_BOX == (0.18, 0.12, 0.82, 0.92) and lay.MOUTH_BOX == (0.36, 0.62, 0.64, 0.82)
    assert lay.resolve_layout("auto", 128, 128) == "demo" and lay.resolve_layout("auto", 512, 512) == "detect"


def test_mouth_openness_is_the_dark_fraction_of_the_mouth_box():
    frame = render(1, mouth=np.array([1.0]), scroll=False)[0]
    mx0, my0, mx1, my1 = lay.pixel_box(lay.MOUTH_BOX, SIZE, SIZE)
    expected = ((my1 - my0 - 4) * (mx1 - mx0 - 8)) / ((my1 - my0) * (mx1 - mx0))
    assert m.mouth_openness(lay.crop(frame, lay.MOUTH_BOX), lay.DARK_LUMA) == pytest.approx(expected)
    closed = render(1, scroll=False)[0]
    assert m.mouth_openness(lay.crop(closed, lay.MOUTH_BOX), lay.DARK_LUMA) == 0.0


def test_loudness_envelope_is_the_rms_of_each_frames_audio():
    rate = 1000
    samples = np.concatenate([np.full(40, 0.5), -np.full(40, 0.25), np.zeros(40)])
    assert m.loudness_envelope(samples, rate, 25, 4) == pytest.approx([0.5, 0.25, 0.0, 0.0])


# ---- seams ----------------------------------------------------------------------------------------------------------


def test_window_boundaries_follow_the_sampler_plan():
    from avatarcli.sampling.windows import latent_frames_for, plan_windows

    windows, boundaries = window_boundaries(300, 21, 8)
    plan = plan_windows(latent_frames_for(300), 21, 8)
    assert [w[0] for w in windows] == [0] + [4 * w.start - 3 for w in plan.windows[1:]]
    assert [b.start_frame for b in boundaries] == [4 * w.start - 3 for w in plan.windows[1:]]
    assert boundaries[0].edges == [48, 80]  # window 1 starts at latent 13 (frame 49); window 0 ends at latent 20
    assert window_boundaries(81)[1] == []  # one window, no seams


def test_jump_at_a_window_boundary_gives_a_high_seam_score_and_a_smooth_video_about_one(tmp_path, reference):
    frames = 60
    smooth = evaluate(EvalJob(write(render(frames), tmp_path / "smooth.mp4"), reference, **SMALL))
    assert len(smooth.boundaries) >= 3
    assert smooth.seams.score == pytest.approx(1.0, abs=0.1)
    assert smooth.seams.overlap_score == pytest.approx(1.0, abs=0.1)

    # a brightness jump (+-20) where each new window begins: transition edge -> edge + 1
    level = np.zeros(frames)
    for b in smooth.boundaries:
        level[b.edges[0] + 1 :] = 20.0 - level[b.edges[0]]
    jumpy = evaluate(EvalJob(write(render(frames, brightness=level), tmp_path / "jumps.mp4"), reference, **SMALL))
    assert jumpy.seams.score > 2.0 and jumpy.seams.worst > 2.0

    one = np.where(np.arange(frames) > smooth.boundaries[1].edges[0], 20.0, 0.0)  # only at the second boundary
    single = evaluate(EvalJob(write(render(frames, brightness=one), tmp_path / "jump.mp4"), reference, **SMALL))
    assert single.seams.worst == single.seams.per_boundary[1] > 2.0
    assert max(single.seams.per_boundary[:1] + single.seams.per_boundary[2:]) < 1.2


def test_seam_scores_on_known_differences():
    d = np.ones(40)
    d[20] = 9.0
    seams = m.seam_scores(d, [[20, 24]], [(20, 24)])
    assert seams.interior_mean == 1.0 and seams.score == pytest.approx(5.0) and seams.overlap_score == 2.6
    assert seams.worst == pytest.approx(5.0)
    still = m.seam_scores(np.zeros(40), [[20, 24]], [(20, 24)])
    assert still.score == 1.0


# ---- flicker --------------------------------------------------------------------------------------------------------


def test_still_video_has_zero_flicker_and_a_flashing_one_does_not(tmp_path, reference):
    still = evaluate(EvalJob(write(render(30, scroll=False), tmp_path / "still.mp4"), reference, **SMALL))
    assert still.flicker == 0.0
    assert float(still.differences.max()) == 0.0
    flashes = np.where(np.arange(30) % 2 == 1, 12.0, 0.0)
    flashing = evaluate(EvalJob(write(render(30, scroll=False, brightness=flashes), tmp_path / "f.mp4"), reference,
                                **SMALL))
    assert flashing.flicker > 15.0


def test_steady_fade_is_not_flicker():
    assert m.flicker(np.linspace(10, 200, 50)) == pytest.approx(0.0, abs=1e-9)


# ---- identity drift -------------------------------------------------------------------------------------------------


def test_drift_grows_on_a_video_whose_colours_drift(tmp_path, reference):
    frames = 60
    shift = np.linspace(0, 1, frames)[:, None] * np.array([-50.0, 10.0, 40.0])
    stable = evaluate(EvalJob(write(render(frames, scroll=False), tmp_path / "stable.mp4"), reference,
                              span_seconds=0.4, **SMALL))
    drifting = evaluate(EvalJob(write(render(frames, skin_shift=shift, scroll=False), tmp_path / "drift.mp4"),
                                reference, span_seconds=0.4, **SMALL))
    assert drifting.drift_end > 3 * max(drifting.drift_start, 1.0)
    assert np.all(np.diff(drifting.drift_per_window) > 0)
    assert float(stable.drift.max()) < 1.0  # only the codec's rounding


def test_talking_alone_is_neither_drift_nor_flicker(talking, reference):
    report = evaluate(EvalJob(talking[0], reference, **SMALL))
    assert float(report.drift.max()) < 1.0  # the mouth's cells are left out of the face distance
    # the mouth moves, nothing else (4:2:0 chroma around the mouth leaks a trace outside its box)
    assert report.flicker < 0.01 and float(report.differences.max()) > 1.0


# ---- PSNR / SSIM ----------------------------------------------------------------------------------------------------


def test_identical_videos_give_capped_psnr_and_ssim_one(tmp_path, reference, talking):
    video = talking[0]
    mouth = np.concatenate([np.zeros(3), talking[2][:-3]])
    copy = write(render(60, mouth=mouth, scroll=False), tmp_path / "copy.mp4")  # encoded again, same frames
    report = evaluate(EvalJob(video, reference, compare=copy, **SMALL))
    assert report.psnr.min() == m.PSNR_CAP and report.ssim.min() == 1.0
    brighter = write(render(60, mouth=mouth, scroll=False, brightness=np.full(60, 6.0)), tmp_path / "b.mp4")
    differs = evaluate(EvalJob(video, reference, compare=brighter, **SMALL))
    # +6 on every pixel that does not clip: about 20 log10(255 / 6) = 32.6 dB
    assert differs.psnr.mean() == pytest.approx(32.6, abs=1.0) and 0.8 < differs.ssim.mean() < 1.0


def test_ssim_and_psnr_on_known_frames():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert m.ssim(a, a) == pytest.approx(1.0) and m.psnr(a, a) == m.PSNR_CAP
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b) ** 2)
    assert m.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert m.ssim(a, 255 - a) < 0


# ---- real videos: the face detector ---------------------------------------------------------------------------------


def real_video(tmp_path: Path, frames: int = 10) -> Path:
    """A still video of the example portrait (a real face) at 160x160: not the demo layout."""
    portrait = np.asarray(Image.open(EXAMPLES / "portrait.png").convert("RGB").resize((160, 160)))
    video = tmp_path / "real.mp4"
    with Mp4Sink(video, 160, 160, FPS, crf=0, preset="ultrafast") as sink:
        sink.write(np.repeat(portrait[None], frames, axis=0))
    return video


def test_detect_layout_on_a_real_portrait(tmp_path):
    """The face detector (MTCNN, tests/test_eval_faces.py) finds the face in the portrait and in the video."""
    video = real_video(tmp_path)
    job = EvalJob(video, EXAMPLES / "portrait.png", **SMALL)
    report = evaluate(job)
    assert report.layout == "detect" and not any("no face" in note for note in report.notes)
    fx0, fy0, fx1, fy1 = lay.FaceDetector()(np.asarray(Image.open(EXAMPLES / "portrait.png").convert("RGB")))
    assert 0.3 < fx0 < 0.45 and 0.55 < fx1 < 0.75 and 0.1 < fy0 < 0.3 and 0.45 < fy1 < 0.65  # the astronaut's face
    assert report.flicker == 0.0 and float(report.drift.max()) < 3.0


def test_face_box_on_a_real_portrait(tmp_path):
    report = evaluate(EvalJob(real_video(tmp_path), EXAMPLES / "portrait.png", face_box=(0.35, 0.17, 0.68, 0.58),
                              **SMALL))
    assert report.layout == "detect" and report.frames == 10
    assert report.flicker == 0.0 and float(report.drift.max()) < 3.0
    assert 0.0 <= float(report.mouth.max()) < 0.5


# ---- the command ----------------------------------------------------------------------------------------------------


def test_eval_json_through_the_console_script_and_plot(tmp_path, talking, reference):
    video, audio, _ = talking
    plot = tmp_path / "curves.png"
    script = Path(sys.executable).parent / "avatarcli"
    result = subprocess.run([str(script), "eval", str(video), "--reference", str(reference), "--audio", str(audio),
                             "--compare", str(video), "--plot", str(plot), "--window", "5", "--overlap", "2",
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["frames"] == 60 and summary["layout"] == "demo"
    assert summary["lip_sync"]["best_lag"] == 3 and summary["lip_sync"]["best_correlation"] > 0.97
    assert summary["compare"]["psnr_min"] == m.PSNR_CAP and summary["compare"]["ssim_mean"] == 1.0
    assert summary["boundaries"] == [9, 21, 33, 41] and summary["seams"]["score"] is not None
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 4 * 200


def test_eval_table_and_default_windows(talking, reference, capsys):
    assert main(["eval", str(talking[0]), "--reference", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "lip sync r" in out and "seam score" in out and "1 window" in out  # 60 frames: one 81-frame window


def test_eval_bad_input_exits_2_with_one_line(tmp_path, talking, reference, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    other_size = tmp_path / "small.mp4"
    with Mp4Sink(other_size, 64, 64, FPS, crf=0) as sink:
        sink.write(np.zeros((3, 64, 64, 3), dtype=np.uint8))
    video = str(talking[0])
    cases = [
        ["eval", str(tmp_path / "missing.mp4"), "--reference", str(reference)],
        ["eval", str(text), "--reference", str(reference)],
        ["eval", video, "--reference", str(tmp_path / "missing.png")],
        ["eval", video, "--reference", str(reference), "--compare", str(other_size)],
        ["eval", video, "--reference", str(reference), "--audio", str(text)],
        ["eval", video, "--reference", str(reference), "--layout", "nope"],
        ["eval", video, "--reference", str(reference), "--face-box", "0.5,0.5,0.2,0.9"],
        ["eval", video, "--reference", str(reference), "--plot", str(tmp_path / "x.jpg")],
        ["eval", video, "--reference", str(reference), "--overlap", "30"],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "x.jpg").exists()


def test_compare_measures_the_mouth_against_the_comparison_video(tmp_path, talking, reference):
    """Generated vs ground truth for the same audio: a mouth two frames late shows as lag +2."""
    video, audio, env = talking  # its mouth is env delayed by 3 frames
    early = write(render(60, mouth=np.concatenate([np.zeros(1), env[:-1]]), scroll=False), tmp_path / "gt.mp4")
    report = evaluate(EvalJob(video, reference, compare=early, **SMALL))
    assert report.mouth_sync.best_lag == 2 and report.mouth_sync.best_correlation > 0.97
    assert report.summary()["compare"]["mouth_best_lag"] == 2


def test_frames_in_memory_measure_the_same_as_the_file(tmp_path, talking, reference):
    """evaluate_frames (a generation measured in-process, no ffmpeg) == evaluate on a file holding those frames."""
    from avatarcli.eval import evaluate_frames
    from avatarcli.eval.video import VideoReader
    from avatarcli.media.audio import load_audio

    video, audio, env = talking
    truth = write(render(60, mouth=np.concatenate([np.zeros(1), env[:-1]]), scroll=False), tmp_path / "gt.mp4")
    frames, truth_frames = (np.stack(list(VideoReader(path))) for path in (video, truth))
    from_file = evaluate(EvalJob(video, reference, compare=truth, **SMALL)).summary()
    in_memory = evaluate_frames(EvalJob(video, reference, **SMALL), frames, FPS, compare=truth_frames,
                                samples=load_audio(video)).summary()  # the track evaluate reads
    assert in_memory == from_file
    assert in_memory["lip_sync"]["best_lag"] == 3 and in_memory["compare"]["mouth_best_lag"] == 2
    with pytest.raises(AvatarError, match="cannot compare"):
        evaluate_frames(EvalJob(video, reference, **SMALL), frames, FPS, compare=truth_frames[:, :32])
