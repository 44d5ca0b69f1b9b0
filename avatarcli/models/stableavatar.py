"""StableAvatar-1.3B: diffusers' Wan2.1 transformer plus the audio adapter and per-block audio key/value projections.

Paper: arXiv 2508.08248. The backbone is Wan2.1-Fun-V1.1-1.3B-InP (an i2v DiT with 36 input channels and a CLIP
branch). Two additions, both matched to the public reference code:
  * `vocal_projector` (models/audio_adapter.py) turns wav2vec2 features into per-latent-frame audio context;
  * every block's cross-attention gets `k_vocal`/`v_vocal`: the video tokens of latent frame f attend to that
    frame's audio window, and the result is added to the text and image attention before the shared output
    projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention

from avatarcli.models.audio_adapter import AudioAdapter
from avatarcli.models.wan import NUM_IMAGE_TOKENS, ConditionedWanBlock, ConditionedWanMixin

@dataclass
class AudioConditioning:
    """Audio input of one batched forward.

    features: [A, T_a, audio_in_dim] wav2vec2 features, one row per distinct audio input.
    branch_audio: for each batch element, the row of `features` it uses, or None for "no audio context"
        (the adapter output replaced by zeros; k_vocal/v_vocal then still add their biases, as in the reference).
    """

    features: torch.Tensor
    branch_audio: list[int | None]


class AvatarAttnProcessor:
    """Cross-attention of a StableAvatar block: image (257 tokens) + text + per-latent-frame audio, one output proj."""

    _attention_backend = None
    _parallel_config = None

    def _attend(self, q, k, v):
        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=None).flatten(2, 3)

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask=None, rotary_emb=None, audio_context: torch.Tensor | None = None) -> torch.Tensor:
        image_context = encoder_hidden_states[:, :NUM_IMAGE_TOKENS]
        text_context = encoder_hidden_states[:, NUM_IMAGE_TOKENS:]
        heads = attn.heads

        # After fuse_qkv_projections() (the compiled path) each context's key and value come from one GEMM.
        fused = getattr(attn, "fused_projections", False)
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
        if fused:
            key, value = attn.to_kv(text_context).chunk(2, dim=-1)
            key_img, value_img = attn.to_added_kv(image_context).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(text_context), attn.to_v(text_context)
            key_img, value_img = attn.add_k_proj(image_context), attn.add_v_proj(image_context)
        key, value = attn.norm_k(key).unflatten(2, (heads, -1)), value.unflatten(2, (heads, -1))
        key_img, value_img = attn.norm_added_k(key_img).unflatten(2, (heads, -1)), value_img.unflatten(2, (heads, -1))

        out = self._attend(query, key, value) + self._attend(query, key_img, value_img)
        if audio_context is not None:
            b, frames, width, _ = audio_context.shape
            q_frames = query.reshape(b * frames, -1, heads, query.shape[-1])
            if fused and hasattr(attn, "to_vocal_kv"):
                k_audio, v_audio = attn.to_vocal_kv(audio_context).chunk(2, dim=-1)
            else:
                k_audio, v_audio = attn.k_vocal(audio_context), attn.v_vocal(audio_context)
            k_audio = k_audio.reshape(b * frames, width, heads, -1)
            v_audio = v_audio.reshape(b * frames, width, heads, -1)
            out = out + self._attend(q_frames, k_audio, v_audio).reshape(b, -1, out.shape[-1])
        out = out.type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class AvatarTransformerBlock(ConditionedWanBlock):
    """A Wan block whose cross-attention also receives the per-latent-frame audio context."""

    condition_name = "audio_context"

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: int | None):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn2.k_vocal = nn.Linear(dim, dim)
        self.attn2.v_vocal = nn.Linear(dim, dim)
        self.attn2.set_processor(AvatarAttnProcessor())


class StableAvatarTransformer3DModel(ConditionedWanMixin, WanTransformer3DModel):
    """Wan2.1-Fun-1.3B-InP + StableAvatar audio path. Input: [noisy 16 | mask 4 | reference latents 16] channels."""

    _no_split_modules = ["AvatarTransformerBlock"]
    _repeated_blocks = ["AvatarTransformerBlock"]

    @register_to_config
    def __init__(self, patch_size=(1, 2, 2), num_attention_heads: int = 12, attention_head_dim: int = 128,
                 in_channels: int = 36, out_channels: int = 16, text_dim: int = 4096, freq_dim: int = 256,
                 ffn_dim: int = 8960, num_layers: int = 30, cross_attn_norm: bool = True,
                 qk_norm: str = "rms_norm_across_heads", eps: float = 1e-6, image_dim: int = 1280,
                 added_kv_proj_dim: int | None = None, rope_max_seq_len: int = 1024, text_len: int = 512,
                 audio_in_dim: int = 768, audio_adapter_heads: int = 8, audio_adapter_layers: int = 2,
                 audio_window_expand: int = 4):
        dim = num_attention_heads * attention_head_dim
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=0,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim or dim, rope_max_seq_len=rope_max_seq_len)
        self.blocks = nn.ModuleList(
            [AvatarTransformerBlock(dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps,
                                    added_kv_proj_dim or dim) for _ in range(num_layers)]
        )
        self.vocal_projector = AudioAdapter(audio_in_dim, dim, dim, heads=audio_adapter_heads,
                                            num_layers=audio_adapter_layers, window_expand=audio_window_expand,
                                            eps=eps)
        # The base constructor registered num_layers=0 (it builds no Wan blocks); record the real values.
        self.register_to_config(num_layers=num_layers, added_kv_proj_dim=added_kv_proj_dim or dim)

    @torch.no_grad()
    def fuse_qkv_projections(self) -> None:
        """diffusers' q/k/v (self-attention) and k/v (text, image) fusion, plus k_vocal/v_vocal as one projection."""
        super().fuse_qkv_projections()
        for block in self.blocks:
            attn = block.attn2
            if hasattr(attn, "to_vocal_kv"):
                continue
            weight = torch.cat([attn.k_vocal.weight, attn.v_vocal.weight])
            bias = torch.cat([attn.k_vocal.bias, attn.v_vocal.bias])
            with torch.device("meta"):
                attn.to_vocal_kv = nn.Linear(weight.shape[1], weight.shape[0])
            attn.to_vocal_kv.load_state_dict({"weight": weight, "bias": bias}, strict=True, assign=True)

    def unfuse_qkv_projections(self) -> None:
        super().unfuse_qkv_projections()
        for block in self.blocks:
            if hasattr(block.attn2, "to_vocal_kv"):
                del block.attn2.to_vocal_kv

    def audio_context(self, audio: AudioConditioning, tokens: torch.Tensor, e0: torch.Tensor, e: torch.Tensor,
                      latent_frames: int) -> torch.Tensor:
        """Run the adapter once per distinct audio row, then lay the results out per batch element."""
        if audio.features.shape[0] == tokens.shape[0] and all(
                row is None or row == i for i, row in enumerate(audio.branch_audio)):
            # One audio row per batch element (training batches): one batched adapter call.
            context = self.vocal_projector(audio.features.to(tokens.dtype), tokens, e0, e, latent_frames)
            keep = torch.tensor([row is not None for row in audio.branch_audio], device=context.device)
            return torch.where(keep.view(-1, 1, 1, 1), context, torch.zeros_like(context))
        contexts = []
        for row in range(audio.features.shape[0]):
            src = audio.branch_audio.index(row)  # all branches share the noisy latent and timestep
            contexts.append(self.vocal_projector(audio.features[row : row + 1].to(tokens.dtype), tokens[src : src + 1],
                                                 e0[src : src + 1], e[src : src + 1], latent_frames))
        zeros = torch.zeros_like(contexts[0])
        return torch.cat([zeros if i is None else contexts[i] for i in audio.branch_audio])

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor, audio: AudioConditioning | None = None) -> torch.Tensor:
        """hidden_states [B, 36, F, h, w], timestep [B] (sigma * 1000), text [B, <=text_len, text_dim],
        image [B, 257, image_dim] -> flow velocity [B, 16, F, h, w]."""
        b, frames = hidden_states.shape[0], hidden_states.shape[2]
        tokens, rotary_emb, e, e0, context = self.embed(hidden_states, timestep, encoder_hidden_states,
                                                        encoder_hidden_states_image)
        audio_context = None
        if audio is not None:
            if len(audio.branch_audio) != b:
                raise ValueError(f"branch_audio has {len(audio.branch_audio)} entries for batch {b}")
            audio_context = self.audio_context(audio, tokens, e0, e, frames // self.config.patch_size[0])
        x = self.run_blocks(tokens, context, e0, rotary_emb, audio_context)
        return self.head(x, e, hidden_states.shape)


def parameter_count(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
