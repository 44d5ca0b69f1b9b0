"""Loading PD-FGC's expression encoder from `pd_fpg.pth` (a pickle, read weights-only, strict keys).

The reference passes the file's top-level mapping straight to `FanEncoder.load_state_dict(..., strict=False)`;
here the same mapping (or its `state_dict` entry) must match the module exactly: 0 missing, 0 unexpected tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.files import check_state_dict, read_checkpoint
from avatarcli.models.pdfgc import FanEncoder

STEM_KEY = "model.conv1.weight"


def load_fan_encoder(path: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> FanEncoder:
    """The FanEncoder of `path` in eval mode; 0 missing and 0 unexpected keys, or a CheckpointError naming them."""
    path = Path(path)
    state = read_checkpoint(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if STEM_KEY not in tensors:
        raise CheckpointError(f"{path} is not a PD-FGC FanEncoder checkpoint (no {STEM_KEY}); is it pd_fpg.pth?")
    # Non-tensor entries (a step counter, a config read as an inert placeholder) are not weights and are skipped;
    # every tensor must match the model exactly.
    model = FanEncoder(width=tensors[STEM_KEY].shape[0])
    check_state_dict(model, tensors, path)
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype).eval()
