"""Merge FlashPortrait's step-distillation LoRA (`fast_lora_rank64.safetensors`, LightX2V layout) into the weights.

File layout: every key is `diffusion_model.<original Wan parameter path>.<kind>` with kind one of
    lora_down.weight + lora_up.weight   (or lora_A.weight + lora_B.weight)   W += s * (up @ down)
    diff                                 <layer>.weight (or the bare <layer> parameter) += s * diff
    diff_b                               <layer>.bias += s * diff_b
    diff_m                               <block>.modulation += s * diff_m
No alpha/rank scaling: the reference merges up @ down as stored. An `alpha` key is accepted only where it equals the
rank (the one case where both conventions agree); anything else would change the merge silently, so it is an error.

Strict, unlike the reference (which skips what it cannot place without a word): a key of an unknown kind, half a
pair, or a target that is not a parameter of the model or does not fit its shape is a CheckpointError naming the key,
and nothing is merged. The merge happens once, at load, in float32, rounded once to the parameter's dtype.

Why not diffusers/PEFT: diffusers' Wan LoRA converter drops `.diff` on norms and has no `.diff_m` (modulation), and
fusing needs PEFT adapters; a plain merge is simpler and strict. Names go through the same diffusers Wan key converter
as the checkpoints (`loading.transformer.diffusers_key`), so norm2/norm3, modulation -> scale_shift_table etc. agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.files import read_state_dict

FAST_LORA_FILE = "fast_lora_rank64.safetensors"
LORA_PREFIX = "diffusion_model."
_PAIR_KINDS = {".lora_down.weight": ("down", "lora_down"), ".lora_up.weight": ("up", "lora_down"),
               ".lora_A.weight": ("down", "lora_A"), ".lora_B.weight": ("up", "lora_A")}


@dataclass
class LoraPair:
    layer: str  # original Wan module path, e.g. blocks.0.self_attn.q
    down: tuple[str, torch.Tensor] | None = None  # (file key, tensor [rank, in, ...])
    up: tuple[str, torch.Tensor] | None = None  # (file key, tensor [out, rank, ...])
    naming: str = ""

    def check(self, shape: torch.Size, source: str) -> None:
        """up @ down must fit the target: linear layers, and convs whose kernel is flattened."""
        (down_key, down), (_, up) = self.down, self.up
        product = (up.shape[0], down.flatten(1).shape[1])
        if product[0] != shape[0] or product[0] * product[1] != shape.numel():
            raise CheckpointError(f"{source}: LoRA key {down_key!r} gives a {product} update, which does not fit "
                                  f"{self.layer}.weight {tuple(shape)}")

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """up @ down in float32 on `device`, shaped like the target."""
        down, up = self.down[1].to(device, torch.float32), self.up[1].to(device, torch.float32)
        return (up.flatten(1) @ down.flatten(1)).reshape(shape)


@dataclass
class LoraDiff:
    key: str  # file key
    targets: tuple[str, ...]  # candidate original parameter names, first existing one wins
    diff: torch.Tensor = field(repr=False)


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)


def parse_lora(lora: Mapping[str, torch.Tensor], source: str = "LoRA") -> tuple[list[LoraPair], list[LoraDiff]]:
    """Group the file's keys into low-rank pairs and additive diffs (original Wan names); strict about the layout."""
    pairs: dict[str, LoraPair] = {}
    diffs: list[LoraDiff] = []
    alphas: dict[str, tuple[str, torch.Tensor]] = {}
    for key in sorted(lora):
        value = lora[key]
        if not key.startswith(LORA_PREFIX):
            raise CheckpointError(f"{source}: unknown LoRA key {key!r} (every key starts with {LORA_PREFIX!r})")
        body = key[len(LORA_PREFIX):]
        pair_kind = next((kind for kind in _PAIR_KINDS if body.endswith(kind)), None)
        if pair_kind is not None:
            layer = body[: -len(pair_kind)]
            half, naming = _PAIR_KINDS[pair_kind]
            pair = pairs.setdefault(layer, LoraPair(layer, naming=naming))
            if pair.naming != naming or getattr(pair, half) is not None:
                raise CheckpointError(f"{source}: {key!r} mixes lora_down/lora_up and lora_A/lora_B for {layer}")
            setattr(pair, half, (key, value))
        elif body.endswith(".diff"):
            layer = body[: -len(".diff")]
            diffs.append(LoraDiff(key, (f"{layer}.weight", layer), value))
        elif body.endswith(".diff_b"):
            diffs.append(LoraDiff(key, (body[: -len(".diff_b")] + ".bias",), value))
        elif body.endswith(".diff_m"):
            diffs.append(LoraDiff(key, (body[: -len(".diff_m")] + ".modulation",), value))
        elif body.endswith(".alpha"):
            alphas[body[: -len(".alpha")]] = (key, value)
        else:
            raise CheckpointError(f"{source}: unknown LoRA key {key!r} (expected lora_down/lora_up, lora_A/lora_B, "
                                  "diff, diff_b or diff_m)")
    for layer, pair in pairs.items():
        present = pair.down or pair.up
        if pair.down is None or pair.up is None:
            raise CheckpointError(f"{source}: {present[0]!r} has no matching {'up' if pair.up is None else 'down'} "
                                  "half")
        if pair.down[1].ndim < 2 or pair.up[1].ndim < 2 or pair.down[1].shape[0] != pair.up[1].shape[1]:
            raise CheckpointError(f"{source}: {pair.down[0]!r} {tuple(pair.down[1].shape)} and {pair.up[0]!r} "
                                  f"{tuple(pair.up[1].shape)} are not a low-rank pair")
    for layer, (key, alpha) in alphas.items():
        if layer not in pairs:
            raise CheckpointError(f"{source}: {key!r} has no LoRA pair")
        rank = pairs[layer].down[1].shape[0]
        if alpha.numel() != 1 or float(alpha) != rank:
            raise CheckpointError(f"{source}: {key!r} = {alpha.flatten()[:1].tolist()} differs from the rank {rank}; "
                                  "the step-distill merge applies no alpha/rank scaling")
    return list(pairs.values()), diffs


def _plan(lora: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], key_map: Callable[[str], str],
          source: str) -> list[tuple[str, Callable[[torch.device], torch.Tensor]]]:
    """(target name in `shapes`, float32 delta on a device) per LoRA term; all checks done before any merge."""
    pairs, diffs = parse_lora(lora, source)
    plan = []
    for pair in pairs:
        target = key_map(f"{pair.layer}.weight")
        if target not in shapes:
            raise CheckpointError(f"{source}: LoRA key {pair.down[0]!r} targets {pair.layer}.weight, which the "
                                  "model does not have")
        pair.check(shapes[target], source)
        plan.append((target, lambda device, pair=pair, shape=shapes[target]: pair.delta(shape, device)))
    for diff in diffs:
        target = next((key_map(t) for t in diff.targets if key_map(t) in shapes), None)
        if target is None:
            raise CheckpointError(f"{source}: LoRA key {diff.key!r} targets {diff.targets[0]}, which the model "
                                  "does not have")
        if tuple(diff.diff.shape) != tuple(shapes[target]):
            raise CheckpointError(f"{source}: LoRA key {diff.key!r} has shape {tuple(diff.diff.shape)}, but "
                                  f"{diff.targets[0]} is {tuple(shapes[target])}")
        plan.append((target, lambda device, diff=diff: diff.diff.to(device, torch.float32)))
    return plan


def merge_lora(state: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], strength: float = 1.0,
               source: str = "LoRA") -> dict[str, torch.Tensor]:
    """A copy of `state` (original Wan names) with the LoRA merged: W + strength * delta, per parameter in the
    reference's order (pairs, then diffs). Tensors of `state` are not modified."""
    merged = dict(state)
    for target, delta in _plan(lora, {k: v.shape for k, v in state.items()}, lambda k: k, source):
        weight = merged[target]
        merged[target] = (weight.float() + strength * delta(weight.device)).to(weight.dtype)
    return merged


@torch.no_grad()
def merge_lora_into_model(model: torch.nn.Module, lora: Mapping[str, torch.Tensor], strength: float = 1.0,
                          source: str = "LoRA", key_map: Callable[[str], str] | None = None) -> int:
    """Merge into a model with diffusers Wan names, in place; returns the number of LoRA terms merged.

    `key_map` turns an original Wan parameter name into the model's (default: the checkpoint converter's)."""
    if key_map is None:
        from avatarcli.loading.transformer import diffusers_key

        key_map = diffusers_key
    params = dict(model.named_parameters())
    plan = _plan(lora, {k: v.shape for k, v in params.items()}, key_map, source)
    for target, delta in plan:
        param = params[target]
        param.copy_((param.float() + strength * delta(param.device)).to(param.dtype))
    return len(plan)
