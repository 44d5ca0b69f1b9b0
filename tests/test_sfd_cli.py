"""`avatarcli sfd` end to end on tiny weights in the published layout, and its user-facing errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from avatarcli.cli_sfd import register
from avatarcli.errors import CheckpointError
from avatarcli.loading.sfd import SFD_MODELS, load_lightningdit, sfd_files
from avatarcli.testing import make_tiny_weights

# The texture VAE upsamples 16x (f16): the image side is 16 times the latent side.
VAE_FACTOR = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def make_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Group callback, so `sfd` stays a named subcommand."""

    register(app)
    return app


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("sfd") / "tiny", model="sfd")


@pytest.fixture(scope="module")
def latent_side(weights) -> int:
    return load_lightningdit(sfd_files(weights, "xl").checkpoint).config.input_size


def invoke(*args: str):
    return CliRunner().invoke(make_app(), ["sfd", *args])


def test_tiny_weights_run_through_the_cli_to_a_png(weights, latent_side, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke("--weights", str(weights), "--class", "207", "--class", "360", "--steps", "6", "-o", str(out))
    assert result.exit_code == 0, result.output
    side = latent_side * VAE_FACTOR
    image = np.asarray(Image.open(out))
    assert image.dtype == np.uint8 and image.shape[2] == 3
    assert image.shape[0] % side == 0 and image.shape[1] % side == 0
    assert (image.shape[0] // side) * (image.shape[1] // side) >= 2
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("model", sorted(SFD_MODELS))
def test_both_models_write_the_adm_npz_layout(weights, latent_side, tmp_path, model):
    out = tmp_path / "samples.npz"
    result = invoke("--weights", str(weights), "--model", model, "--random", "3", "--steps", "4",
                    "--guidance", "cfg", "--npz", str(out))
    assert result.exit_code == 0, result.output
    arr = np.load(out)["arr_0"]
    side = latent_side * VAE_FACTOR
    assert arr.shape == (3, side, side, 3) and arr.dtype == np.uint8


def test_images_do_not_depend_on_the_batch_size_but_on_the_seed(weights, tmp_path):
    def run(name: str, *extra: str) -> np.ndarray:
        folder = tmp_path / name
        args = ["--weights", str(weights), "--class", "1,2,3", "--steps", "5", "--images-dir", str(folder), *extra]
        assert invoke(*args).exit_code == 0
        return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])

    one_batch = run("b3", "--batch-size", "3")
    single = run("b1", "--batch-size", "1")
    other_seed = run("s1", "--batch-size", "3", "--seed", "1")
    assert one_batch.shape[0] == 3
    np.testing.assert_allclose(one_batch.astype(int), single.astype(int), atol=1)
    assert np.abs(one_batch.astype(int) - other_seed.astype(int)).max() > 10


def test_adaptive_and_heun_solvers_run(weights, tmp_path):
    for extra in (["--adaptive"], ["--solver", "heun", "--steps", "3"]):
        out = tmp_path / "a.npz"
        result = invoke("--weights", str(weights), "--class", "5", "--npz", str(out), *extra)
        assert result.exit_code == 0, result.output
        assert np.load(out)["arr_0"].shape[0] == 1


def test_missing_weights_exit_3_with_one_line_saying_what_to_download(tmp_path):
    result = invoke("--weights", str(tmp_path), "--class", "1", "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "avatarcli download sfd-xl" in result.stderr


@pytest.mark.parametrize("args", [["--class", "1"], ["--class", "1", "--random", "2", "-o", "x.png"],
                                  ["--class", "5000", "-o", "x.png"], ["--class", "1", "--steps", "2", "-o", "x.png"]])
def test_bad_requests_exit_2(weights, args):
    result = invoke("--weights", str(weights), *args)
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_a_checkpoint_with_an_unknown_key_is_refused_naming_the_file_and_key(weights, tmp_path):
    source = sfd_files(weights, "xl").checkpoint
    state = torch.load(source, weights_only=True)
    state["ema"]["blocks.0.attn.extra"] = torch.zeros(1)
    broken = tmp_path / "4000000.pt"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"4000000\.pt.*blocks\.0\.attn\.extra"):
        load_lightningdit(broken)


def test_the_ema_entry_is_preferred_and_the_repa_projector_ignored(weights, tmp_path):
    source = sfd_files(weights, "xl").checkpoint
    ema = torch.load(source, weights_only=True)["ema"]
    assert any(k.startswith("repa_projector.") for k in ema)
    garbage = {k: torch.zeros(1) for k in ema}
    both = tmp_path / "both.pt"
    torch.save({"model": garbage, "ema": ema}, both)
    model = load_lightningdit(both)
    assert torch.equal(model.y_embedder.embedding_table.weight, ema["y_embedder.embedding_table.weight"])
