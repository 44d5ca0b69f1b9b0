"""What StableAvatar and FlashPortrait share on top of diffusers' Wan2.1 transformer.

Both papers keep the Wan i2v DiT and add one conditioning stream to every block's cross-attention (audio context per
latent frame; expression tokens per latent frame). So the block differs only in the keyword its cross-attention
processor takes, and the model only in what it computes for that keyword; the embedding of time, text and CLIP
tokens, the block loop and the output head are these.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

NUM_IMAGE_TOKENS = 257  # CLIP ViT-H/14 penultimate hidden states, prepended to the text context


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] embedding computed in float64, as the reference does (float32 differs by ~1e-5 at t~1000)."""
    half = dim // 2
    t = timestep.double()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


class ConditionedWanBlock(WanTransformerBlock):
    """A Wan block whose cross-attention processor also receives `condition` under the keyword `condition_name`."""

    condition_name = "condition"

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, condition=None):
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table + temb.float()).chunk(6, dim=1)
        x = hidden_states
        y = self.attn1((self.norm1(x.float()) * (1 + scale) + shift).type_as(x), None, None, rotary_emb)
        x = (x.float() + y * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), encoder_hidden_states,
                           **{self.condition_name: condition})
        y = self.ffn((self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x))
        return (x.float() + y.float() * c_gate).type_as(x)


class ConditionedWanMixin:
    """The shared forward pieces of a WanTransformer3DModel subclass with `text_len` in its config."""

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
        for block in self.blocks:
            x = block(x, context, e0, rotary_emb, condition)
        return x

    def head(self, x: torch.Tensor, e: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Output norm, projection and unpatchify: tokens -> velocity [B, C_out, F, H, W] for an input of `shape`."""
        b, _, frames, height, width = shape
        p_t, p_h, p_w = self.config.patch_size
        shift, scale = (self.scale_shift_table + e.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out((self.norm_out(x.float()) * (1 + scale) + shift).type_as(x))
        x = x.reshape(b, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
