"""StableAvatar transformer checkpoints in the ORIGINAL published key layout, at any size.

`original_key_shapes` spells out the reference model's state-dict names (Wan2.1 i2v DiT + StableAvatar audio keys,
stableavatar.md §3.5) independently of the converter in avatarcli.loading, so tests can check the converter against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The published Wan2.1-Fun-V1.1-1.3B-InP / StableAvatar-1.3B sizes.
FULL_SIZE = dict(dim=1536, num_heads=12, in_dim=36, out_dim=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                 num_layers=30, image_dim=1280, audio_in_dim=768, audio_layers=2, text_len=512, eps=1e-6)


def wan_config(sizes: dict) -> dict:
    """The base folder's config.json (original Wan naming)."""
    return {"_class_name": "WanModel", "model_type": "i2v", "dim": sizes["dim"], "ffn_dim": sizes["ffn_dim"],
            "freq_dim": sizes["freq_dim"], "in_dim": sizes["in_dim"], "num_heads": sizes["num_heads"],
            "num_layers": sizes["num_layers"], "out_dim": sizes["out_dim"], "text_len": sizes["text_len"],
            "eps": sizes["eps"]}


def wan_i2v_key_shapes(sizes: dict, cross_extras=lambda block: {}) -> dict[str, tuple[int, ...]]:
    """The Wan2.1 i2v DiT's original state-dict names and shapes; `cross_extras(block prefix)` adds a paper's own
    cross-attention parameters to every block (after k_img / v_img)."""
    d, f = sizes["dim"], sizes["ffn_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, sizes["in_dim"], 1, 2, 2), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, sizes["text_dim"]), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, sizes["freq_dim"]), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.head.weight": (4 * sizes["out_dim"], d), "head.head.bias": (4 * sizes["out_dim"],),
        "head.modulation": (1, 2, d),
    }
    i = sizes["image_dim"]
    shapes.update({"img_emb.proj.0.weight": (i,), "img_emb.proj.0.bias": (i,), "img_emb.proj.1.weight": (i, i),
                   "img_emb.proj.1.bias": (i,), "img_emb.proj.3.weight": (d, i), "img_emb.proj.3.bias": (d,),
                   "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,)})
    for n in range(sizes["num_layers"]):
        b = f"blocks.{n}"
        shapes[f"{b}.modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                shapes[f"{b}.{attn}.{p}.weight"], shapes[f"{b}.{attn}.{p}.bias"] = (d, d), (d,)
            shapes[f"{b}.{attn}.norm_q.weight"] = shapes[f"{b}.{attn}.norm_k.weight"] = (d,)
        for p in ("k_img", "v_img"):
            shapes[f"{b}.cross_attn.{p}.weight"], shapes[f"{b}.cross_attn.{p}.bias"] = (d, d), (d,)
        shapes.update(cross_extras(b))
        shapes[f"{b}.cross_attn.norm_k_img.weight"] = (d,)
        shapes[f"{b}.norm3.weight"] = shapes[f"{b}.norm3.bias"] = (d,)
        shapes.update({f"{b}.ffn.0.weight": (f, d), f"{b}.ffn.0.bias": (f,), f"{b}.ffn.2.weight": (d, f),
                       f"{b}.ffn.2.bias": (d,)})
    return shapes


def original_key_shapes(sizes: dict) -> dict[str, tuple[int, ...]]:
    d = sizes["dim"]

    def audio_keys(b: str) -> dict[str, tuple[int, ...]]:
        return {f"{b}.cross_attn.{p}.{kind}": (d, d) if kind == "weight" else (d,)
                for p in ("k_vocal", "v_vocal") for kind in ("weight", "bias")}

    shapes = wan_i2v_key_shapes(sizes, audio_keys)
    v = "vocal_projector"
    shapes.update({f"{v}.proj_model.proj.weight": (d, sizes["audio_in_dim"]), f"{v}.proj_model.norm.weight": (d,),
                   f"{v}.proj_model.norm.bias": (d,), f"{v}.final_head.final_proj.weight": (d, d),
                   f"{v}.final_head.final_proj.bias": (d,), f"{v}.final_head.modulation": (1, 2, d)})
    for n in range(sizes["audio_layers"]):
        b = f"{v}.blocks.{n}"
        shapes.update({f"{b}.modulation": (1, 6, d), f"{b}.norm3.weight": (d,), f"{b}.norm3.bias": (d,),
                       f"{b}.cross_attn.norm_q.weight": (d,), f"{b}.cross_attn.norm_k.weight": (d,),
                       f"{b}.ffn.0.weight": (2 * d, d), f"{b}.ffn.0.bias": (2 * d,), f"{b}.ffn.2.weight": (d, 2 * d),
                       f"{b}.ffn.2.bias": (d,)})
        for p in ("q", "k", "v", "o"):
            shapes[f"{b}.cross_attn.{p}.weight"], shapes[f"{b}.cross_attn.{p}.bias"] = (d, d), (d,)
    return shapes


def random_state_dict(sizes: dict, seed: int = 0, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights with sensible scales: norms near 1, linear layers ~1/sqrt(fan_in), biases small.

    device="meta" gives shape-only tensors (for key/shape checks of the full-size layout)."""
    if device == "meta":
        return {k: torch.empty(shape, device="meta", dtype=dtype) for k, shape in original_key_shapes(sizes).items()}
    gen = torch.Generator(device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device)

    state = {}
    for key, shape in original_key_shapes(sizes).items():
        if "norm" in key or key.endswith((".proj.0.weight", ".proj.4.weight", ".proj.0.bias", ".proj.4.bias")):
            value = 1 + 0.1 * randn(shape) if key.endswith("weight") else 0.1 * randn(shape)
        elif key.endswith("modulation"):
            value = randn(shape) / shape[-1] ** 0.5
        else:
            fan_in = shape[1] if len(shape) > 1 else shape[0]
            for s in shape[2:]:
                fan_in *= s
            value = randn(shape) / fan_in**0.5 * (0.1 if key.endswith("bias") else 1.0)
        state[key] = value.to(dtype)
    return state


def write_tiny_transformer(folder: Path, sizes: dict, seed: int = 0) -> None:
    """Base config.json + both StableAvatar .pt checkpoints in the published folder layout."""
    folder = Path(folder)
    base, avatar = folder / "Wan2.1-Fun-V1.1-1.3B-InP", folder / "StableAvatar-1.3B"
    base.mkdir(parents=True, exist_ok=True)
    avatar.mkdir(parents=True, exist_ok=True)
    (base / "config.json").write_text(json.dumps(wan_config(sizes), indent=2))
    for n, name in enumerate(("transformer3d-square.pt", "transformer3d-rec-vec.pt")):
        torch.save(random_state_dict(sizes, seed + n), avatar / name)


def stock_wan_twin(model: torch.nn.Module) -> torch.nn.Module:
    """Stock diffusers `WanTransformer3DModel` sharing `model`'s Wan weights (no copy), without the audio path.

    The yardstick of the speed benchmarks: the same backbone, sizes, dtypes and devices, run by diffusers' own
    block and attention code. Its forward takes (latents, timestep, text, image, return_dict=False)."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    c = model.config
    with torch.device("meta"):
        stock = WanTransformer3DModel(
            patch_size=tuple(c.patch_size), num_attention_heads=c.num_attention_heads,
            attention_head_dim=c.attention_head_dim, in_channels=c.in_channels, out_channels=c.out_channels,
            text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
            cross_attn_norm=c.cross_attn_norm, qk_norm=c.qk_norm, eps=c.eps, image_dim=c.image_dim,
            added_kv_proj_dim=c.added_kv_proj_dim, rope_max_seq_len=c.rope_max_seq_len)
    wanted = stock.state_dict().keys()
    shared = {k: v for k, v in model.state_dict().items() if k in wanted}
    stock.load_state_dict(shared, strict=True, assign=True)
    device = next(model.parameters()).device
    stock.rope = WanRotaryPosEmbed(c.attention_head_dim, tuple(c.patch_size), c.rope_max_seq_len).to(device)
    return stock.eval()
