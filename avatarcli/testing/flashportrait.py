"""FlashPortrait checkpoints in the PUBLISHED layout at any size: transformer.pt overlay + Wan2.1-I2V base shards.

`original_key_shapes` spells out the reference's state-dict names (Wan2.1 i2v DiT + emo_k/v_proj, and the portrait
encoder's keys; flashportrait.md §2, §4a) independently of the converter in avatarcli.loading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from avatarcli.loading.flashportrait import BASE_FOLDER, ENCODER_FILE, FLASHPORTRAIT_FOLDER, OVERLAY_FILE, SHARD_INDEX

# Wan2.1-I2V-14B-720P / FlashPortrait sizes (resampler: dim 1280, depth 4, 20 heads of 64).
FULL_SIZE = dict(dim=5120, num_heads=40, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                 num_layers=40, image_dim=1280, text_len=512, eps=1e-6, emo_token_dim=2048,
                 resampler_dim=1280, resampler_depth=4, resampler_heads=20, resampler_dim_head=64, ff_mult=4)
# Tiny: widths agree with the tiny umT5 (32) and CLIP (32) of avatarcli.testing.components.
TINY_SIZE = dict(FULL_SIZE, dim=32, num_heads=2, text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, image_dim=32,
                 emo_token_dim=32, resampler_dim=64, resampler_depth=1, resampler_heads=1, resampler_dim_head=64)
SHARDS = 7


def wan_config(sizes: dict) -> dict:
    """The base folder's config.json (original Wan naming, as Wan-AI/Wan2.1-I2V-14B-720P publishes it)."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v", "dim": sizes["dim"],
            "eps": sizes["eps"], "ffn_dim": sizes["ffn_dim"], "freq_dim": sizes["freq_dim"], "in_dim": sizes["in_dim"],
            "num_heads": sizes["num_heads"], "num_layers": sizes["num_layers"], "out_dim": sizes["out_dim"],
            "text_len": sizes["text_len"]}


def transformer_key_shapes(sizes: dict, expression: bool = True) -> dict[str, tuple[int, ...]]:
    """Wan2.1 i2v DiT keys (original names); with `expression`, FlashPortrait's emo_k/v_proj too."""
    from avatarcli.testing.stableavatar import wan_i2v_key_shapes

    d, c = sizes["dim"], sizes["emo_token_dim"]

    def expression_keys(b: str) -> dict[str, tuple[int, ...]]:
        if not expression:
            return {}
        return {f"{b}.cross_attn.emo_k_proj.weight": (d, c), f"{b}.cross_attn.emo_v_proj.weight": (d, c)}

    return wan_i2v_key_shapes(sizes, expression_keys)


def portrait_encoder_key_shapes(sizes: dict) -> dict[str, tuple[int, ...]]:
    c, r = sizes["emo_token_dim"], sizes["resampler_dim"]
    inner, ff = sizes["resampler_heads"] * sizes["resampler_dim_head"], r * sizes["ff_mult"]
    shapes: dict[str, tuple[int, ...]] = {
        "proj_model.headpose_proj.weight": (c, 6), "proj_model.eye_proj.weight": (c, 6),
        "proj_model.emo_proj.weight": (c, 30), "proj_model.mouth_proj.weight": (c, 512),
        "proj_model.norm.weight": (c,), "proj_model.norm.bias": (c,)}
    for name, queries, width in (("mouth_proj_model", 16, 512), ("emo_proj_model", 4, 30)):
        shapes.update({f"{name}.latents": (1, queries, r), f"{name}.proj_in.weight": (r, width),
                       f"{name}.proj_in.bias": (r,), f"{name}.proj_out.weight": (c, r), f"{name}.proj_out.bias": (c,),
                       f"{name}.norm_out.weight": (c,), f"{name}.norm_out.bias": (c,)})
        for layer in range(sizes["resampler_depth"]):
            p = f"{name}.layers.{layer}"
            shapes.update({f"{p}.0.norm1.weight": (r,), f"{p}.0.norm1.bias": (r,), f"{p}.0.norm2.weight": (r,),
                           f"{p}.0.norm2.bias": (r,), f"{p}.0.to_q.weight": (inner, r),
                           f"{p}.0.to_kv.weight": (2 * inner, r), f"{p}.0.to_out.weight": (r, inner),
                           f"{p}.1.0.weight": (r,), f"{p}.1.0.bias": (r,), f"{p}.1.1.weight": (ff, r),
                           f"{p}.1.3.weight": (r, ff)})
    return shapes


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Norms near 1, linear layers ~1/sqrt(fan_in), small biases; device="meta" for shape-only tensors."""
    if device == "meta":
        return {k: torch.empty(s, device="meta", dtype=dtype) for k, s in shapes.items()}
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, device=device)
        if "norm" in key or key.endswith((".proj.0.weight", ".proj.4.weight", ".proj.0.bias", ".proj.4.bias",
                                          ".1.0.weight", ".1.0.bias")):
            value = 1 + 0.1 * noise if key.endswith("weight") else 0.1 * noise
        elif key.endswith(("modulation", "latents")):
            value = noise / shape[-1] ** 0.5
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            value = noise / max(fan_in, 1) ** 0.5 * (0.1 if key.endswith("bias") else 1.0)
        state[key] = value.to(dtype)
    return state


def is_fine_tuned(key: str) -> bool:
    """What FlashPortrait's training unfroze: every parameter whose name holds both "blocks" and "attn"."""
    return "blocks" in key and "attn" in key


def write_base_shards(folder: Path, state: Mapping[str, torch.Tensor], shards: int = SHARDS) -> None:
    """diffusion_pytorch_model-0000i-of-0000n.safetensors + the index, keys split in order."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for n in range(shards):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[n * per : (n + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (folder / SHARD_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))


def write_flashportrait_weights(path: Path, transformer: Mapping[str, torch.Tensor],
                                encoder: Mapping[str, torch.Tensor], config: dict, *, overlay: str = "fine-tuned",
                                base_seed: int = 1, shards: int = SHARDS) -> Path:
    """Both folders. transformer: full original-layout state dict (with emo projections).

    overlay "fine-tuned": transformer.pt holds the fine-tuned attention weights and the emo projections, the base
    shards every stock weight (attention weights there are DIFFERENT random values, as stock Wan's differ from
    FlashPortrait's); "all": transformer.pt holds the whole model and the shards are random stock weights.
    """
    path = Path(path)
    fp, base = path / FLASHPORTRAIT_FOLDER, path / BASE_FOLDER
    fp.mkdir(parents=True, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    stock_shapes = {k: tuple(v.shape) for k, v in transformer.items() if ".emo_" not in k}
    stock = random_state(stock_shapes, base_seed, dtype=next(iter(transformer.values())).dtype)
    for key in stock:
        if not is_fine_tuned(key):
            stock[key] = transformer[key]
    write_base_shards(base, stock, shards)
    kept = transformer if overlay == "all" else {k: v for k, v in transformer.items() if is_fine_tuned(k)}
    torch.save(dict(kept), fp / OVERLAY_FILE)
    torch.save(dict(encoder), fp / ENCODER_FILE)
    return path


def make_tiny_flashportrait(path: str | Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Both folders in the published layout at a tiny config, with tiny VAE, umT5 (+ tokenizer) and CLIP, and the
    face files when the front end's writer is available."""
    from avatarcli.testing.components import write_tiny_clip, write_tiny_t5, write_tiny_vae

    sizes = sizes or TINY_SIZE
    path = Path(path)
    write_flashportrait_weights(path, random_state(transformer_key_shapes(sizes), seed),
                                random_state(portrait_encoder_key_shapes(sizes), seed + 1), wan_config(sizes),
                                base_seed=seed + 2)
    base = path / BASE_FOLDER
    write_tiny_vae(base, seed + 3)
    write_tiny_t5(base, seed + 4)
    write_tiny_clip(base, seed + 5)
    from avatarcli.testing.flashportrait_face import write_tiny_face_files

    write_tiny_face_files(path / FLASHPORTRAIT_FOLDER)
    from avatarcli.testing.flashportrait_turbo import write_tiny_turbo_files

    write_tiny_turbo_files(path / FLASHPORTRAIT_FOLDER, transformer_key_shapes(sizes), seed=seed + 6)
    return path
