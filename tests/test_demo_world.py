"""The synthetic demo world: deterministic from seeds, and the layout contract `avatarcli eval` relies on."""

from __future__ import annotations

import numpy as np
import pytest

from avatarcli.demo import world


def test_identity_speech_and_video_are_deterministic_from_seeds():
    assert world.random_identity(4) == world.random_identity(4)
    assert world.random_identity(4) != world.random_identity(5)
    a, b = world.speech(4, 2.0), world.speech(4, 2.0)
    assert a.dtype == np.float32 and len(a) == 2 * world.SAMPLE_RATE
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, world.speech(5, 2.0))
    v1, v2 = world.render_video(4, a, motion_seed=1), world.render_video(4, a, motion_seed=1)
    assert v1.shape == (50, world.SIZE, world.SIZE, 3) and v1.dtype == np.uint8
    np.testing.assert_array_equal(v1, v2)


def test_speech_has_syllables_and_pauses():
    samples = world.speech(7, 8.0)
    rms = world.loudness(samples)
    assert np.abs(samples).max() <= 0.51
    loud = rms > 0.3 * rms.max()
    quiet = rms < 0.05 * rms.max()
    assert 0.25 < loud.mean() < 0.85 and quiet.mean() > 0.05
    onsets = np.count_nonzero(loud[1:] & ~loud[:-1])
    assert onsets >= 8 * 2  # at least two syllables a second


@pytest.mark.parametrize("seed", range(6))
def test_dark_mouth_pixels_track_the_ground_truth_openness(seed):
    samples = world.speech(seed, 4.0)
    video = world.render_video(seed, samples, motion_seed=seed)
    openness = world.mouth_openness(samples, frames=len(video))
    dark = world.dark_fraction(video)
    assert openness.min() < 0.001 and openness.max() == 1.0
    assert np.corrcoef(dark, openness)[0, 1] > 0.98
    assert dark[openness < 0.001].max() == 0.0  # closed: a lip line, nothing dark
    assert dark.max() > 0.1


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_layout_contract_holds_at_extreme_sway(seed):
    identity = world.random_identity(seed)
    assert world.luma(identity.skin) >= world.MIN_SKIN_LUMA
    assert world.luma(identity.lips) > world.DARK_LUMA
    rows, cols = world.box_pixels(world.MOUTH_BOX)
    face_rows, face_cols = world.box_pixels(world.FACE_BOX)
    for dx in (-0.02, 0.02):
        for dy in (-0.01, 0.01):
            closed = world.render_frame(identity, world.FrameState(0.0, 1.0, dx, dy))
            assert world.dark_fraction(closed) == 0.0  # nothing dark in MOUTH_BOX but an open mouth
            opened = world.render_frame(identity, world.FrameState(1.0, 0.0, dx, dy))
            dark = world.luma(opened) <= world.DARK_LUMA
            inside = np.zeros_like(dark)
            inside[rows, cols] = True
            assert dark[rows, cols].any() and not (dark & ~inside & _mouth_band(dark.shape)).any()
            # the face (skin-coloured pixels of the face's rows) stays inside FACE_BOX
            skin = np.all(opened == np.array(identity.skin, dtype=np.uint8), axis=-1)
            outside = np.ones_like(skin)
            outside[face_rows, face_cols] = False
            assert not (skin & outside)[: int(0.85 * world.SIZE)].any()


def _mouth_band(shape):
    """The lower face around the mouth: an open mouth's dark pixels there must all lie in MOUTH_BOX."""
    band = np.zeros(shape, dtype=bool)
    band[int(0.55 * shape[0]) : int(0.85 * shape[0]), int(0.3 * shape[1]) : int(0.7 * shape[1])] = True
    return band


def test_portrait_is_neutral_and_the_right_size():
    image = world.portrait(0)
    assert image.size == (world.SIZE, world.SIZE) and image.mode == "RGB"
    assert world.dark_fraction(np.asarray(image)) == 0.0
