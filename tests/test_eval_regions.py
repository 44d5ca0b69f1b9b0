"""`avatarcli eval`: identity against the portrait by region (whole frame, face box, and the demo world's hair, skin,
shirt and background), on clips rendered by the demo world itself."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarcli.cli import main
from avatarcli.demo import world
from avatarcli.eval import EvalJob, evaluate, evaluate_frames
from avatarcli.eval import layout as lay
from avatarcli.eval import metrics as m
from avatarcli.eval.report import REGIONS, region_span
from avatarcli.media.audio import write_wav
from avatarcli.sink.ffmpeg import Mp4Sink

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = dict(window_frames=5, overlap=2)
SEED = 11
FRAMES = 50  # 2 s
CHANGE = 30  # the shirt changes colour from this frame on
NEW_SHIRT = (235, 235, 20)


def clip(identity: world.Identity, change: int | None = None, shirt=NEW_SHIRT) -> tuple[np.ndarray, np.ndarray]:
    """The identity speaking the world's speech (mouth, blinks and sway as world.render_video draws them); from frame
    `change` on, in a shirt of another colour. Returns frames [T, 128, 128, 3] and the 16 kHz samples."""
    samples = world.speech(SEED, FRAMES / world.FPS)
    frames = world.frame_count(len(samples))
    openness = world.mouth_openness(samples, frames=frames)
    blink, dx, dy = world.motion(SEED, frames)
    recoloured = dataclasses.replace(identity, shirt=shirt)
    video = np.stack([
        world.render_frame(recoloured if change is not None and t >= change else identity,
                           world.FrameState(float(openness[t]), float(blink[t]), float(dx[t]), float(dy[t])))
        for t in range(frames)])
    np.testing.assert_array_equal(video if change is None else video[:change],
                                  world.render_video(identity, samples, motion_seed=SEED)[: change or frames])
    return video, samples


def write(video: np.ndarray, path: Path, audio: Path | None = None) -> Path:
    with Mp4Sink(path, video.shape[2], video.shape[1], world.FPS, audio_path=audio, crf=0,
                 preset="ultrafast") as sink:
        sink.write(video)
    return path


@pytest.fixture(scope="module")
def identity() -> world.Identity:
    return world.random_identity(SEED)


@pytest.fixture(scope="module")
def portrait(identity, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("portrait") / "portrait.png"
    world.portrait(identity).save(path)
    return path


@pytest.fixture(scope="module")
def shirt_change(identity):
    return clip(identity, CHANGE)


# ---- the layout contract --------------------------------------------------------------------------------------------


def test_demo_part_masks_hold_for_any_identity_sway_blink_and_mouth():
    """Every pixel of a part's mask shows that part in frames of identities the masks were not made from, at random
    head sways, blinks and mouth openings, and at the extremes of the sway."""
    masks = lay.demo_part_masks()
    assert tuple(masks) == lay.DEMO_PARTS == ("hair", "skin", "shirt", "background")
    sizes = {name: int(mask.sum()) for name, mask in masks.items()}
    assert sizes["hair"] >= 100 and sizes["skin"] >= 600 and sizes["shirt"] >= 300 and sizes["background"] >= 5000
    assert sum(sizes.values()) == int(np.any(np.stack(list(masks.values())), axis=0).sum())  # disjoint
    mx0, my0, mx1, my1 = lay.pixel_box(lay.MOUTH_BOX, world.SIZE, world.SIZE)
    assert not any(mask[my0:my1, mx0:mx1].any() for mask in masks.values())
    rng = np.random.default_rng(0)
    sway_x, sway_y = world.MAX_SWAY
    states = [world.FrameState(float(rng.uniform()), float(rng.uniform()), float(rng.uniform(-sway_x, sway_x)),
                               float(rng.uniform(-sway_y, sway_y))) for _ in range(150)]
    states += [world.FrameState(1.0, 0.0, x, y) for x in (-sway_x, sway_x) for y in (-sway_y, sway_y)]
    for k, state in enumerate(states):
        parts = world.part_map(world.random_identity(5000 + k), state)
        for name, mask in masks.items():
            assert np.all(parts[mask] == world.PARTS.index(name)), (k, name)


def test_part_map_is_render_frames_geometry(identity):
    """part_map labels each pixel with the part render_frame draws there in the identity's own colours."""
    state = world.FrameState(0.6, 0.0, 0.013, -0.007)
    frame, parts = world.render_frame(identity, state), world.part_map(identity, state)
    for index, name in enumerate(world.PARTS):
        colour = np.array(getattr(identity, name))
        if name == "background":  # a vertical gradient from `background` to `background_low`
            continue
        assert (parts == index).any() and np.all(frame[parts == index] == colour), name
    assert (parts == -1).any()  # eye whites, pupils, shading, edges


def test_demo_part_masks_scale_with_the_frame():
    small, large = lay.demo_part_masks(), lay.demo_part_masks(256, 256)
    for name in lay.DEMO_PARTS:
        assert large[name].shape == (256, 256)
        np.testing.assert_array_equal(large[name][::2, ::2], small[name])
        assert not large[name].flags.writeable


def test_demo_layout_takes_the_contract_from_the_world():
    assert lay.FACE_BOX is world.FACE_BOX and lay.MOUTH_BOX is world.MOUTH_BOX
    assert lay.DEMO_SIZE == (world.SIZE, world.SIZE) and lay.DEMO_FPS == world.FPS
    assert lay.DARK_LUMA == world.DARK_LUMA


# ---- the metrics ----------------------------------------------------------------------------------------------------


def test_masked_psnr_and_delta_e_on_known_frames():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 246, (24, 32, 3), dtype=np.uint8)
    b = a.copy()
    mask = np.zeros((24, 32), dtype=bool)
    mask[:, :16] = True
    b[:, 16:] += 10  # only outside the mask
    distance = m.RegionDistance(a, {"frame": None, "left": mask, "right": ~mask})
    values = distance(b)
    assert values["left"] == (m.PSNR_CAP, 0.0)
    assert values["right"][0] == pytest.approx(20 * np.log10(255 / 10))
    assert values["frame"][0] == pytest.approx(m.psnr(a, b))
    lab_a, lab_b = m.srgb_to_lab(a[:, 16:]), m.srgb_to_lab(b[:, 16:])
    assert values["right"][1] == pytest.approx(float(np.sqrt(((lab_a - lab_b) ** 2).sum(-1)).mean()))
    assert values["frame"][1] == pytest.approx(values["right"][1] / 2)


def test_lab_of_uint8_equals_lab_of_the_same_floats():
    rgb = np.arange(256 * 3, dtype=np.int64).reshape(256, 3) % 256
    rgb[:, 1], rgb[:, 2] = rgb[::-1, 1], (rgb[:, 2] * 7) % 256
    np.testing.assert_array_equal(m.srgb_to_lab(rgb.astype(np.uint8)), m.srgb_to_lab(rgb.astype(np.float64)))


def test_region_span_is_a_tenth_of_the_frames_at_least_one():
    assert [region_span(n) for n in (1, 9, 10, 11, 50, 60, 750)] == [1, 1, 1, 2, 5, 6, 75]


# ---- eval on demo-world clips ---------------------------------------------------------------------------------------


def test_a_changed_shirt_raises_only_the_shirts_distance(shirt_change, portrait):
    video, samples = shirt_change
    report = evaluate_frames(EvalJob(Path("shirt.mp4"), portrait, **SMALL), video, world.FPS, samples=samples)
    regions = report.summary()["portrait"]["regions"]
    assert report.summary()["portrait"]["span_frames"] == 5 and tuple(regions) == REGIONS
    shirt = regions["shirt"]
    assert shirt["delta_e_start"] == 0.0 and shirt["psnr_start"] == m.PSNR_CAP  # the world draws parts exactly
    assert shirt["delta_e_end"] > 30 and shirt["psnr_end"] < 20
    for name in ("hair", "skin", "background"):  # every frame, not only start and end
        curve = report.regions[name]
        assert float(curve.delta_e.max()) == 0.0 and float(curve.psnr.min()) == m.PSNR_CAP, name
    curve = report.regions["shirt"]
    assert float(curve.delta_e[:CHANGE].max()) == 0.0 and float(curve.delta_e[CHANGE:].min()) > 30
    # the whole frame and the face box also see the sway, blinks and the speaking mouth: not zero, but the shirt
    # shows in the frame's end and not in the face box's
    frame, face = regions["frame"], regions["face"]
    assert 0 < frame["delta_e_start"] < frame["delta_e_end"] and 15 < frame["psnr_end"] < frame["psnr_start"]
    assert face["delta_e_end"] < 5 and face["psnr_end"] > 20


def test_shirt_change_through_the_file_and_the_command(shirt_change, portrait, tmp_path):
    """The same clip as an mp4 (yuv420p: the codec's colour rounding is the floor) through `avatarcli eval --json`:
    the shirt's DeltaE jumps at the end, the other demo regions stay near zero."""
    video, samples = shirt_change
    write_wav(tmp_path / "speech.wav", samples)
    path = write(video, tmp_path / "shirt.mp4", tmp_path / "speech.wav")
    plot = tmp_path / "curves.png"
    script = Path(sys.executable).parent / "avatarcli"
    result = subprocess.run([str(script), "eval", str(path), "--reference", str(portrait), "--window", "5",
                             "--overlap", "2", "--plot", str(plot), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layout"] == "demo" and "notes" not in summary
    regions = summary["portrait"]["regions"]
    assert regions["shirt"]["delta_e_start"] < 2 and regions["shirt"]["delta_e_end"] > 30
    assert regions["shirt"]["psnr_start"] > 35 and regions["shirt"]["psnr_end"] < 20
    for name in ("hair", "skin", "background"):
        region = regions[name]
        assert region["delta_e_start"] < 2 and region["delta_e_end"] < 2 and region["psnr_end"] > 35, name
        assert region["pixels"] == int(lay.demo_part_masks()[name].sum())
    with Image.open(plot) as image:  # lip sync, drift, by region, seams
        assert image.height >= 4 * 240


def test_identical_video_hits_the_psnr_cap_in_every_region(identity, portrait, tmp_path):
    still = np.repeat(np.asarray(world.portrait(identity))[None], 12, axis=0)
    report = evaluate_frames(EvalJob(Path("still.mp4"), portrait, **SMALL), still, world.FPS)
    for name, region in report.summary()["portrait"]["regions"].items():
        assert region["psnr_start"] == region["psnr_end"] == region["psnr_mean"] == m.PSNR_CAP, name
        assert region["delta_e_start"] == region["delta_e_end"] == 0.0, name
    # through a file: the portrait is the decoded first frame, so every decoded frame equals it exactly
    video = write(still, tmp_path / "still.mp4")
    first = tmp_path / "first.png"
    from avatarcli.eval.video import VideoReader

    Image.fromarray(next(iter(VideoReader(video)))).save(first)
    summary = evaluate(EvalJob(video, first, **SMALL)).summary()
    assert {name: r["psnr_end"] for name, r in summary["portrait"]["regions"].items()} == dict.fromkeys(
        REGIONS, m.PSNR_CAP)


# ---- other layouts --------------------------------------------------------------------------------------------------


def test_a_real_video_measures_frame_and_face_only(tmp_path, capsys):
    """Not the demo layout: hair, skin, shirt and background are not measured (null), never made up."""
    portrait = np.asarray(Image.open(EXAMPLES / "portrait.png").convert("RGB").resize((160, 160)))
    video = write(np.repeat(portrait[None], 6, axis=0), tmp_path / "real.mp4")
    report = evaluate(EvalJob(video, EXAMPLES / "portrait.png", face_box=(0.35, 0.17, 0.68, 0.58), **SMALL))
    assert report.layout == "detect"
    regions = report.summary()["portrait"]["regions"]
    assert [name for name, region in regions.items() if region is not None] == ["frame", "face"]
    assert all(regions[name] is None for name in lay.DEMO_PARTS)
    assert regions["frame"]["pixels"] == 160 * 160 and regions["face"]["psnr_end"] > 25
    assert any("not measured" in note for note in report.notes)
    assert main(["eval", str(video), "--reference", str(EXAMPLES / "portrait.png"), "--face-box",
                 "0.35,0.17,0.68,0.58", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["portrait"]["regions"]["shirt"] is None and summary["portrait"]["regions"]["face"] is not None


def test_detect_layout_on_a_demo_clip_leaves_the_demo_regions_out(shirt_change, portrait, capsys, tmp_path):
    video, samples = shirt_change
    job = EvalJob(Path("shirt.mp4"), portrait, layout="detect", face_box=lay.FACE_BOX, **SMALL)
    regions = evaluate_frames(job, video, world.FPS, samples=samples).summary()["portrait"]["regions"]
    assert regions["frame"] is not None and regions["face"] is not None
    assert all(regions[name] is None for name in lay.DEMO_PARTS)
    path = write(video, tmp_path / "shirt.mp4")
    assert main(["eval", str(path), "--reference", str(portrait), "--layout", "detect", "--face-box",
                 ",".join(map(str, lay.FACE_BOX))]) == 0
    out = capsys.readouterr().out
    assert "vs portrait: frame" in out and "vs portrait: face" in out
    assert "vs portrait: hair," in out and "not measured" in out  # one row for the four (the table may wrap)


def test_table_lists_every_demo_region(shirt_change, portrait, tmp_path, capsys):
    video, samples = shirt_change
    write_wav(tmp_path / "speech.wav", samples)
    path = write(video, tmp_path / "shirt.mp4", tmp_path / "speech.wav")
    assert main(["eval", str(path), "--reference", str(portrait)]) == 0
    out = capsys.readouterr().out
    for name in REGIONS:
        assert f"vs portrait: {name}" in out
    assert "not measured" not in out
