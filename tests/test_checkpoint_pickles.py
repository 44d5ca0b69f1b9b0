"""Weights-only reading of pickles that carry non-tensor objects beside the weights (loading/files.py).

The files are crafted here: a foreign class (standing in for OmegaConf's DictConfig, which SFD's training script
saves next to `ema`) must come back as an inert placeholder with the tensors intact; a pickle that would run a
command must be refused without running it.
"""

from __future__ import annotations

import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.files import InertObject, read_checkpoint, read_state_dict
from avatarcli.loading.pdfgc import load_fan_encoder
from avatarcli.loading.sfd import load_lightningdit
from avatarcli.models.sfd import LightningDiT
from avatarcli.testing.flashportrait_face import tiny_fan_state_dict
from avatarcli.testing.sfd import tiny_lightningdit_config

MODULE = "trainingcfg_for_tests.dictconfig"


class DictConfig:
    """Pickles like OmegaConf's containers: a plain class whose state holds nested containers and metadata."""

    def __init__(self, content, flags=None):
        self._content = content
        self._metadata = Metadata(flags or {})

    def __getstate__(self):
        return {"_content": self._content, "_metadata": self._metadata}


class Metadata:
    def __init__(self, flags):
        self.flags = flags


@contextmanager
def foreign_module():
    """Register the classes under a module name that will not exist when the file is read back."""
    package, module = types.ModuleType(MODULE.split(".")[0]), types.ModuleType(MODULE)
    for cls in (DictConfig, Metadata):
        cls.__module__ = MODULE
        setattr(module, cls.__name__, cls)
    sys.modules[package.__name__], sys.modules[MODULE] = package, module
    try:
        yield
    finally:
        del sys.modules[MODULE], sys.modules[package.__name__]
        for cls in (DictConfig, Metadata):
            cls.__module__ = __name__


def save_with_config(path: Path, state: dict) -> Path:
    config = DictConfig({"lr": 1e-4, "model": DictConfig({"depth": 2})}, flags={"readonly": True})
    with foreign_module():
        torch.save({**state, "args": config}, path)
    return path


class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_foreign_classes_become_inert_placeholders_and_tensors_survive(tmp_path):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_with_config(tmp_path / "ckpt.pt", {"ema": weights})
    state = read_checkpoint(path)
    assert torch.equal(state["ema"]["w"], weights["w"])
    config = state["args"]
    assert isinstance(config, InertObject) and config.original_name == f"{MODULE}.DictConfig"
    assert config.state["_content"]["lr"] == 1e-4
    assert isinstance(config.state["_content"]["model"], InertObject)
    assert read_state_dict(path, "ema").keys() == {"w"}


def test_a_pickle_that_runs_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": RunsCommand(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to read .*evil\.pt.*system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_pickle_calling_a_builtin_is_refused(tmp_path):
    path = tmp_path / "eval.pt"

    class CallsEval:
        def __reduce__(self):
            return eval, ("1 + 1",)

    torch.save({"w": torch.ones(2), "payload": CallsEval()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to read .*builtins\.eval"):
        read_checkpoint(path)


def test_a_corrupt_pickle_is_one_line_naming_it(tmp_path):
    path = tmp_path / "pd_fpg.pth"
    path.write_bytes(b"\x80\x02 not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot read .*pd_fpg\.pth") as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value)


def test_sfd_loader_reads_a_training_checkpoint_with_its_config_beside_ema(tmp_path):
    config = tiny_lightningdit_config(hidden_size=32, num_heads=2)
    ema = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in LightningDiT(config).state_dict().items()}
    path = save_with_config(tmp_path / "4000000.pt", {"ema": ema})
    model = load_lightningdit(path, config)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[key]), key


def test_pdfgc_loader_reads_pd_fpg_with_a_foreign_object_beside_the_weights(tmp_path):
    state = tiny_fan_state_dict(seed=3)
    path = save_with_config(tmp_path / "pd_fpg.pth", {"state_dict": state})
    model = load_fan_encoder(path)
    assert torch.equal(model.state_dict()["to_mouth.0.weight"], state["to_mouth.0.weight"])
    assert not model.training


def test_pdfgc_loader_skips_non_tensor_entries_but_not_extra_tensors(tmp_path):
    state = {**tiny_fan_state_dict(seed=4), "epoch": 12}
    torch.save(state, tmp_path / "pd_fpg.pth")
    assert load_fan_encoder(tmp_path / "pd_fpg.pth").model.conv1.weight.shape[0] > 0
    state["audio_encoder.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "pd_fpg.pth")
    with pytest.raises(CheckpointError, match=r"pd_fpg\.pth.*1 unexpected: audio_encoder\.weight"):
        load_fan_encoder(tmp_path / "pd_fpg.pth")
