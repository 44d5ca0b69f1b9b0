"""Load FlashPortrait from the published files, unchanged and strictly.

Layout of `--weights DIR`:
    FlashPortrait/transformer.pt          (FrancisRing/FlashPortrait) fine-tuned attention weights + emo_k/v_proj,
                                          original Wan key names, optionally nested under "state_dict"
    FlashPortrait/portrait_encoder.pt     proj_model.* / mouth_proj_model.* / emo_proj_model.*
    Wan2.1-I2V-14B-720P/config.json       (Wan-AI/Wan2.1-I2V-14B-720P, original layout)
    Wan2.1-I2V-14B-720P/diffusion_pytorch_model-0000{1..7}-of-00007.safetensors + .safetensors.index.json
    Wan2.1-I2V-14B-720P/Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
    Wan2.1-I2V-14B-720P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth

The reference loads transformer.pt with strict=False over the base model. Here: every overlay key must name a model
weight, every model weight must come from the overlay or the base shards, and the expression projections must come
from the overlay. Base shard tensors are read only for the weights the overlay lacks (none at all when it holds the
whole model). The model is built on meta and the tensors assigned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from avatarcli.errors import CheckpointError
from avatarcli.loading.files import check_state_dict, listing, read_state_dict
from avatarcli.loading.transformer import _FP32_PATTERNS, assign_weights, read_wan_config, wan_key_names
from avatarcli.models.flashportrait import FlashPortraitTransformer3DModel, PortraitEncoder, ResamplerSize

FLASHPORTRAIT_FOLDER = "FlashPortrait"
BASE_FOLDER = "Wan2.1-I2V-14B-720P"
OVERLAY_FILE = "transformer.pt"
ENCODER_FILE = "portrait_encoder.pt"
SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = f"{BASE_FOLDER}/Wan2.1_VAE.pth"
T5_FILE = f"{BASE_FOLDER}/models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_FOLDER = f"{BASE_FOLDER}/google/umt5-xxl"
CLIP_FILE = f"{BASE_FOLDER}/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
RESAMPLER_HEAD_DIM = 64  # the reference's Resampler(dim_head=64); heads = inner width / 64


def is_expression_key(key: str) -> bool:
    return ".cross_attn.emo_k_proj." in key or ".cross_attn.emo_v_proj." in key


def storage_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if any(p in key for p in _FP32_PATTERNS) else dtype


class BaseShards:
    """The base model's sharded safetensors, opened lazily: nothing is read until a key is asked for."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._weight_map: dict[str, str] | None = None

    @property
    def weight_map(self) -> dict[str, str]:
        """Original key -> shard file name (from the index; a single unsharded file is accepted too)."""
        if self._weight_map is None:
            index = self.folder / SHARD_INDEX
            single = self.folder / "diffusion_pytorch_model.safetensors"
            if index.is_file():
                try:
                    self._weight_map = dict(json.loads(index.read_text())["weight_map"])
                except (OSError, ValueError, KeyError, TypeError) as error:
                    raise CheckpointError(f"cannot read the shard index {index} ({error}); download it again") \
                        from error
            elif single.is_file():
                self._weight_map = {k: single.name for k in self._open(single.name).keys()}
            else:
                raise CheckpointError(f"missing {index}: the base model's weights are needed for the weights "
                                      f"{OVERLAY_FILE} lacks; download {BASE_FOLDER}")
            self._weight_map = {k.removeprefix("model.diffusion_model."): v for k, v in self._weight_map.items()}
        return self._weight_map

    def _open(self, name: str):
        from safetensors import safe_open

        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"missing base shard {path}; download {BASE_FOLDER} again")
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read {path} ({' '.join(str(error).split())[:200]}); download it again") \
                from error

    def _key_in_file(self, handle, key: str) -> str:
        return key if key in handle.keys() else f"model.diffusion_model.{key}"

    def shape(self, key: str) -> tuple[int, ...] | None:
        name = self.weight_map.get(key)
        if name is None:
            return None
        handle = self._open(name)
        return tuple(handle.get_slice(self._key_in_file(handle, key)).get_shape())

    def read(self, keys: list[str], convert: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors of `keys` (original names), one shard open at a time, each converted as soon as it is read."""
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for name, names in sorted(by_shard.items()):
            handle = self._open(name)
            try:
                for key in names:
                    out[key] = convert(key, handle.get_tensor(self._key_in_file(handle, key)))
            except CheckpointError:
                raise
            except Exception as error:
                raise CheckpointError(f"cannot read {self.folder / name} ({' '.join(str(error).split())[:200]}); "
                                      "download it again") from error
        return out


def transformer_config(wan_config: Mapping, shape: Callable[[str], tuple[int, ...]]) -> dict:
    """Constructor arguments: sizes from config.json, widths config.json lacks from tensor shapes."""
    if wan_config.get("model_type", "i2v") != "i2v":
        raise CheckpointError(f"the base model is a Wan2.1 {wan_config.get('model_type')} model; FlashPortrait needs "
                              "Wan2.1-I2V-14B-720P")
    dim, num_heads = int(wan_config["dim"]), int(wan_config["num_heads"])
    _, _, *patch = shape("patch_embedding.weight")
    return dict(
        patch_size=tuple(patch),
        num_attention_heads=num_heads,
        attention_head_dim=dim // num_heads,
        in_channels=int(wan_config.get("in_dim", 36)),
        out_channels=int(wan_config.get("out_dim", 16)),
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=int(wan_config.get("freq_dim", 256)),
        ffn_dim=int(wan_config["ffn_dim"]),
        num_layers=int(wan_config["num_layers"]),
        eps=float(wan_config.get("eps", 1e-6)),
        image_dim=shape("img_emb.proj.0.weight")[0],
        text_len=int(wan_config.get("text_len", 512)),
        emo_token_dim=shape("blocks.0.cross_attn.emo_k_proj.weight")[1],
    )


def build_flashportrait_transformer(overlay: Mapping[str, torch.Tensor], wan_config: Mapping,
                                    base: BaseShards | None = None, *, dtype: torch.dtype = torch.float32,
                                    device: str | torch.device = "cpu", source: str = OVERLAY_FILE
                                    ) -> FlashPortraitTransformer3DModel:
    """The transformer from an overlay state dict (original names) over the base shards, strictly."""
    overlay = {k.removeprefix("model.diffusion_model."): v for k, v in overlay.items()}

    def shape(key: str) -> tuple[int, ...]:
        if key in overlay:
            return tuple(overlay[key].shape)
        found = base.shape(key) if base is not None and not is_expression_key(key) else None
        if found is None:
            raise CheckpointError(f"{source} lacks {key!r}" + ("" if is_expression_key(key) else
                                  " and so does the base model") + "; is this FlashPortrait's transformer.pt?")
        return found

    config = transformer_config(wan_config, shape)
    with torch.device("meta"):
        model = FlashPortraitTransformer3DModel(**config)
    expected = model.state_dict()

    names = wan_key_names(overlay, is_expression_key)
    unexpected = sorted(k for k, new in names.items() if new not in expected)
    if unexpected:
        raise CheckpointError(f"{source} holds {len(unexpected)} weights FlashPortrait does not have: "
                              f"{listing(unexpected)}; is it the right file?")
    from_overlay = set(names.values())
    lacking = sorted(k for k in expected if k not in from_overlay)
    emo_lacking = [k for k in lacking if ".emo_k_proj." in k or ".emo_v_proj." in k]
    if emo_lacking:
        raise CheckpointError(f"{source} lacks the expression projections {listing(emo_lacking)}; they must come "
                              "from FlashPortrait's transformer.pt, not the base model")

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=storage_dtype(key, dtype))

    on_meta = all(t.device.type == "meta" for t in overlay.values())
    state = {names[k]: (v if on_meta else convert(names[k], v)) for k, v in overlay.items()}
    if lacking:
        if base is None:
            raise CheckpointError(f"{source} lacks {len(lacking)} weights and no base model was given: "
                                  f"{listing(lacking)}")
        base_names = {new: original for original, new in wan_key_names(base.weight_map, is_expression_key).items()}
        absent = [k for k in lacking if k not in base_names]
        if absent:
            raise CheckpointError(f"{len(absent)} weights are in neither {source} nor the base model "
                                  f"{base.folder}: {listing(absent)}")
        new_name = {base_names[k]: k for k in lacking}
        read = base.read(list(new_name), lambda original, t: convert(new_name[original], t))
        state.update({new_name[original]: t for original, t in read.items()})
    check_state_dict(model, state, source)
    return assign_weights(model, state, dtype=dtype, device=device)


def load_flashportrait_transformer(weights_dir: Path, *, dtype: torch.dtype = torch.bfloat16,
                                   device: str | torch.device = "cpu") -> FlashPortraitTransformer3DModel:
    weights_dir = Path(weights_dir)
    path = weights_dir / FLASHPORTRAIT_FOLDER / OVERLAY_FILE
    overlay = read_state_dict(path, entry="state_dict")
    base_dir = weights_dir / BASE_FOLDER
    return build_flashportrait_transformer(overlay, read_wan_config(base_dir), BaseShards(base_dir), dtype=dtype,
                                           device=device, source=str(path))


# ---- portrait encoder ---------------------------------------------------------------------------------------------


def resampler_size(state: Mapping[str, torch.Tensor], prefix: str, heads: int | None) -> tuple[ResamplerSize, int]:
    def shape(key: str) -> tuple[int, ...]:
        if prefix + key not in state:
            raise CheckpointError(f"portrait encoder checkpoint lacks {prefix + key!r}; is it portrait_encoder.pt?")
        return tuple(state[prefix + key].shape)

    _, queries, dim = shape("latents")
    inner = shape("layers.0.0.to_q.weight")[0]
    heads = heads or max(inner // RESAMPLER_HEAD_DIM, 1)
    depth = len({k[len(prefix):].split(".")[1] for k in state if k.startswith(prefix + "layers.")})
    size = ResamplerSize(dim=dim, depth=depth, dim_head=inner // heads, heads=heads,
                         ff_mult=shape("layers.0.1.1.weight")[0] // dim)
    return size, queries


def build_portrait_encoder(state: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu", resampler_heads: int | None = None,
                           source: str = ENCODER_FILE) -> PortraitEncoder:
    """Sizes from tensor shapes; the resampler head count (not visible in shapes) is inner width / 64 unless given."""
    if "proj_model.norm.weight" not in state:
        raise CheckpointError(f"{source} lacks 'proj_model.norm.weight'; is it portrait_encoder.pt?")
    mouth, mouth_queries = resampler_size(state, "mouth_proj_model.", resampler_heads)
    emo, emo_queries = resampler_size(state, "emo_proj_model.", resampler_heads)
    with torch.device("meta"):
        encoder = PortraitEncoder(state["proj_model.norm.weight"].shape[0], mouth, emo, mouth_queries, emo_queries)
    check_state_dict(encoder, state, source)
    encoder.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                            assign=True)
    return encoder.eval().requires_grad_(False)


def load_portrait_encoder(weights_dir: Path, *, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu", resampler_heads: int | None = None) -> PortraitEncoder:
    path = Path(weights_dir) / FLASHPORTRAIT_FOLDER / ENCODER_FILE
    return build_portrait_encoder(read_state_dict(path, entry="state_dict"), dtype=dtype, device=device,
                                  resampler_heads=resampler_heads, source=str(path))


# ---- everything -------------------------------------------------------------------------------------------------


@dataclass
class FlashPortraitComponents:
    transformer: FlashPortraitTransformer3DModel
    portrait_encoder: PortraitEncoder
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None  # dropped once the prompts are encoded
    tokenizer: object
    image_encoder: torch.nn.Module
    prompt_cache: dict = field(default_factory=dict)  # (negative, positive) -> their umT5 embeddings


def load_flashportrait(weights_dir: Path, device: str | torch.device, dtype: torch.dtype,
                       transformer_device: str | torch.device | None = None,
                       with_text_encoder: bool = True) -> FlashPortraitComponents:
    """DiT in `dtype` (on `transformer_device`, default `device`; "cpu" when it will be offloaded); portrait encoder,
    VAE and CLIP in float32, umT5 in bfloat16 on CUDA (float32 on CPU), as the reference."""
    from avatarcli.loading.components import load_image_encoder, load_text_encoder, load_vae

    weights_dir = Path(weights_dir)
    text_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    text_encoder = tokenizer = None
    if with_text_encoder:  # left out when the prompts' embeddings are cached (features/prompt_cache.py)
        text_encoder, tokenizer = load_text_encoder(weights_dir / T5_FILE, weights_dir / TOKENIZER_FOLDER,
                                                    dtype=text_dtype, device=device)
    return FlashPortraitComponents(
        transformer=load_flashportrait_transformer(weights_dir, dtype=dtype,
                                                   device=transformer_device or device),
        portrait_encoder=load_portrait_encoder(weights_dir, device=device),
        vae=load_vae(weights_dir / VAE_FILE, device=device),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=load_image_encoder(weights_dir / CLIP_FILE, device=device),
    )
