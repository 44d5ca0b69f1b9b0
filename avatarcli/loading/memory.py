"""Memory options for a large transformer: where its weights live and in which dtype they are stored.

Both go through diffusers/accelerate machinery rather than our own:
  * `--weights-dtype fp8`: diffusers' layerwise casting; Linear/Conv weights are stored as float8_e4m3fn and cast to
    the compute dtype (bf16) per layer during the forward. Patch embedding, condition embedder and norms keep their
    dtype (WanTransformer3DModel's skip patterns), as the reference keeps its modulation out of fp8.
  * umT5 (11.4 GB in bf16), where `place_text_encoder` puts it (the audio driver's load; either driver's reload for a
    new prompt), runs offloaded leaf module by leaf module with `--offload` or when it does not fit the memory left;
  * `--offload model`: the whole transformer moves to the GPU at its first forward (accelerate's
    cpu_offload_with_hook) — the text and image encoders are never resident beside it;
    `--offload group`: diffusers' group offloading, one block on the GPU at a time (prefetched on a CUDA stream);
    `--offload sequential`: the same at leaf-module level (least memory, slowest).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

OFFLOAD_MODES = ("none", "model", "group", "sequential")
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


@dataclass
class Placement:
    """Where the transformer's inputs must go and in which dtype; `hook.offload()` frees the GPU (model offload)."""

    device: torch.device
    dtype: torch.dtype
    hook: object | None = None

    def release(self) -> None:
        if self.hook is not None:
            self.hook.offload()


def apply_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Store Linear/Conv weights in float8_e4m3fn, compute in `compute_dtype` (diffusers' layerwise casting)."""
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)


def apply_offload(model: torch.nn.Module, mode: str, device: str | torch.device) -> object | None:
    """Attach the offloading hooks of `mode` to a model whose weights are on the CPU; returns the model-offload hook."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device)
    if mode == "none":
        model.to(device)
        return None
    if mode == "model":
        from accelerate import cpu_offload_with_hook

        _, hook = cpu_offload_with_hook(model, execution_device=device)
        return hook
    stream = device.type == "cuda"
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level" if mode == "group" else "leaf_level",
                               num_blocks_per_group=1 if mode == "group" else None, use_stream=stream)
    return None


def place_transformer(model: torch.nn.Module, device: str | torch.device, *, offload: str = "none",
                      weights_dtype: str = "bf16", compute_dtype: torch.dtype = torch.bfloat16) -> Placement:
    """Apply the memory options to a transformer loaded on the CPU in `compute_dtype`.

    fp8 storage is applied before the weights move, so a 14B model never needs its bf16 size on the GPU."""
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weights dtype {weights_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if weights_dtype == "fp8":
        apply_fp8_storage(model, compute_dtype)
    hook = apply_offload(model, offload, device)
    return Placement(torch.device(device), compute_dtype, hook)


def place_text_encoder(encoder: torch.nn.Module, device: str | torch.device, offload: str = "none") -> bool:
    """Put umT5, loaded on the CPU, where it runs: whole on `device`, or, with `--offload` or where its weights do not
    fit the memory left (avatarcli/budget.py), kept on the host and moved to `device` one leaf module at a time as
    its forward reaches it (diffusers' leaf-level group offloading, prefetched on a CUDA stream): a few GiB on the
    GPU instead of 11. It encodes the prompts once and is freed. Returns whether it is offloaded."""
    from avatarcli.budget import device_budget, text_encoder_offloaded

    device = torch.device(device)
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    if not text_encoder_offloaded(device_budget(device), weights, offload):
        encoder.to(device)
        return False
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(encoder, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=device.type == "cuda")
    return True


def park_on_host(*modules: torch.nn.Module | None) -> None:
    """Move models that the window-steps do not use (CLIP, the float32 VAE once the reference is encoded) to the host
    while the DiT denoises, so their GPU memory serves the window-steps and the decode; the next job of a batch moves
    them back with `.to(device)` (a copy of ~3 GB, well under a second)."""
    for module in modules:
        if module is not None and any(p.device.type != "cpu" for p in module.parameters()):
            module.to("cpu")


def movable_gpu_bytes(model: torch.nn.Module | None) -> int:
    """The bytes of `model`'s parameters and buffers on a GPU that `.to("cpu")` can free: 0 when offload hooks manage
    its placement or its weights are not plain tensors (fp8 subclasses)."""
    if model is None or has_offload_hooks(model):
        return 0
    tensors = list(model.parameters()) + list(model.buffers())
    if any(type(t.data) is not torch.Tensor for t in tensors):
        return 0
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


@contextmanager
def on_host_while(model: torch.nn.Module | None, device: torch.device, move: bool = True) -> Iterator[None]:
    """`model` on the host for the block and back on `device` after (when `move`): room on the GPU for a transient
    that does not fit beside it (a copy of its weights each way, ~1 s for 3 GB)."""
    if not move or model is None:
        yield
        return
    park_on_host(model)
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.to(device)


def has_offload_hooks(model: torch.nn.Module) -> bool:
    """Whether diffusers (group offloading / layerwise casting) or accelerate hooks are attached anywhere."""
    return any(hasattr(m, "_diffusers_hook") or hasattr(m, "_hf_hook") for m in model.modules())


def decode_copy(vae, dtype: torch.dtype):
    """The VAE to decode with in `dtype`: the loaded one when it already has that dtype, else a cast copy, so the
    loaded VAE keeps encoding references in its own dtype (float32) for the later jobs of a batch."""
    if next(vae.parameters()).dtype == dtype:
        return vae
    import copy

    from avatarcli.runtime import quiet_diffusers

    with quiet_diffusers():  # diffusers warns on casting a VAE with .to(); nothing in the Wan VAE needs float32
        return copy.deepcopy(vae).to(dtype)
