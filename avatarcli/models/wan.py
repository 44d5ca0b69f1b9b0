"""What StableAvatar and FlashPortrait share on top of diffusers' Wan2.1 transformer.

Both papers keep the Wan i2v DiT and add one conditioning stream to every block's cross-attention (audio context per
latent frame; expression tokens per latent frame). So the block differs only in the keyword its cross-attention
processor takes, and the model only in what it computes for that keyword; the embedding of time, text and CLIP
tokens, the block loop and the output head are these.

Numerics (`use_numerics`, the preset field and option `numerics`): "reference" runs the blocks' modulation, LayerNorms
and gated residual adds, the head's norm and modulation, and RoPE in float32, as the published code and diffusers do
(bit for bit the forward before the setting existed); "fast" runs them in the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

NUM_IMAGE_TOKENS = 257  # CLIP ViT-H/14 penultimate hidden states, prepended to the text context


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] embedding computed in float64, as the reference does (float32 differs by ~1e-5 at t~1000)."""
    half = dim // 2
    t = timestep.double()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class ReferenceNumerics:
    """The reference's numerics: modulation, LayerNorms and gated residual adds in float32, the result cast back to
    the activations' dtype; RoPE tables kept in float32 (so RoPE is applied in float32)."""

    name = "reference"

    @staticmethod
    def modulation(table: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return table + temb.float()

    @staticmethod
    def norm(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x.float()).type_as(x)

    @staticmethod
    def modulate(layer: torch.nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (layer(x.float()) * (1 + scale) + shift).type_as(x)

    @staticmethod
    def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (x.float() + y.float() * gate).type_as(x)

    @staticmethod
    def rope(rotary_emb, dtype: torch.dtype):
        return rotary_emb


class FastNumerics:
    """Everything in the activations' dtype (bf16 on a GPU): the modulation table and the LayerNorm affine weights
    cast to it, LayerNorm computed by F.layer_norm on that dtype (its kernels accumulate in float32), modulation and
    gated residual adds rounded after each op, RoPE tables cast once per forward."""

    name = "fast"

    @staticmethod
    def modulation(table: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return table.to(temb.dtype) + temb

    @staticmethod
    def norm(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s LayerNorm on x's dtype; the affine weights taken to x's device too, since the layer's own
        hooks (leaf-level offloading) do not run when it is not called."""
        weight = None if layer.weight is None else layer.weight.to(x.device, x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.device, x.dtype)
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)

    @staticmethod
    def modulate(layer: torch.nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return FastNumerics.norm(layer, x) * (1 + scale.to(x.dtype)) + shift.to(x.dtype)

    @staticmethod
    def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + y.to(x.dtype) * gate.to(x.dtype)

    @staticmethod
    def rope(rotary_emb, dtype: torch.dtype):
        return tuple(table.to(dtype) for table in rotary_emb)


NUMERICS = {numerics.name: numerics for numerics in (ReferenceNumerics, FastNumerics)}


class ConditionedWanBlock(WanTransformerBlock):
    """A Wan block whose cross-attention processor also receives `condition` under the keyword `condition_name`.
    `numerics` (set by `use_numerics`) says in which dtype modulation, norms and residual adds run."""

    condition_name = "condition"
    numerics = ReferenceNumerics

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, condition=None):
        n = self.numerics
        shift, scale, gate, c_shift, c_scale, c_gate = n.modulation(self.scale_shift_table, temb).chunk(6, dim=1)
        x = hidden_states
        y = self.attn1(n.modulate(self.norm1, x, shift, scale), None, None, rotary_emb)
        x = n.gated_add(x, y, gate)
        x = x + self.attn2(n.norm(self.norm2, x), encoder_hidden_states, **{self.condition_name: condition})
        y = self.ffn(n.modulate(self.norm3, x, c_shift, c_scale))
        return n.gated_add(x, y, c_gate)


def use_numerics(model: torch.nn.Module, name: str) -> None:
    """Run a ConditionedWanMixin model's blocks and head with the numerics `name` ("reference" or "fast"), in place;
    before compiling (a compiled block recompiles when it changes)."""
    if name not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {name!r}")
    model.numerics = NUMERICS[name]
    for block in model.blocks:
        block.numerics = NUMERICS[name]


class ConditionedWanMixin:
    """The shared forward pieces of a WanTransformer3DModel subclass with `text_len` in its config."""

    numerics = ReferenceNumerics  # the output head's and RoPE's; use_numerics sets it with the blocks'

    def pad_text(self, text: torch.Tensor) -> torch.Tensor:
        """Zero-pad text embeddings to `text_len` rows; the reference pads before its text MLP and attends all rows."""
        missing = self.config.text_len - text.shape[1]
        if missing < 0:
            raise ValueError(f"text has {text.shape[1]} tokens, more than text_len={self.config.text_len}")
        return torch.nn.functional.pad(text, (0, 0, 0, missing)) if missing else text

    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, image: torch.Tensor):
        """(patch tokens, RoPE, time embedding e, block modulation e0, context = [CLIP tokens | padded text])."""
        rotary_emb = self.rope(hidden_states)
        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        emb = self.condition_embedder
        sinusoid = timestep_sinusoid(timestep, self.config.freq_dim)
        e = emb.time_embedder(sinusoid.to(next(emb.time_embedder.parameters()).dtype)).type_as(tokens)
        e0 = emb.time_proj(emb.act_fn(e)).unflatten(1, (6, -1))
        context = torch.cat([emb.image_embedder(image).type_as(tokens),
                             emb.text_embedder(self.pad_text(text)).type_as(tokens)], dim=1)
        return tokens, rotary_emb, e, e0, context

    def run_blocks(self, x: torch.Tensor, context: torch.Tensor, e0: torch.Tensor, rotary_emb, condition
                   ) -> torch.Tensor:
        rotary_emb = self.numerics.rope(rotary_emb, x.dtype)
        for block in self.blocks:
            x = block(x, context, e0, rotary_emb, condition)
        return x

    def head(self, x: torch.Tensor, e: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Output norm, projection and unpatchify: tokens -> velocity [B, C_out, F, H, W] for an input of `shape`."""
        b, _, frames, height, width = shape
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = self.numerics.modulation(self.scale_shift_table, e.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(self.numerics.modulate(self.norm_out, x, shift, scale))
        x = x.reshape(b, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
