"""FlashPortrait: Wan2.1-I2V-14B plus the portrait encoder and the Normalized Facial Expression Block (NFEB).

Paper: arXiv 2512.16900. Matched to the public reference code (flashportrait.md §4):
  * `PortraitEncoder` turns each driving frame's 554 PD-FGC values into 24 tokens (4 projected slices, 16 mouth
    resampler tokens, 4 emotion resampler tokens);
  * `group_tokens` lays those tokens out per latent frame (97 slots: the 4 pixel frames of the latent plus one token
    of the frame before; latent 0 is its pixel frame's 24 tokens followed by 73 zero slots);
  * every block's cross-attention gets `emo_k_proj`/`emo_v_proj`: the video tokens of latent frame f attend to that
    frame's 97 slots (frame-local, same normalised query as text and image), the result is rescaled to the global
    mean/std of the text+image attention output and added with weight `ip_scale` before the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention

from avatarcli.models.wan import NUM_IMAGE_TOKENS, ConditionedWanBlock, ConditionedWanMixin

FEATURE_SPLIT = (("headpose", 6), ("eye", 6), ("emo", 30), ("mouth", 512))  # PD-FGC order, 554 values per frame
FEATURE_DIM = sum(n for _, n in FEATURE_SPLIT)
PIXEL_FRAMES_PER_LATENT = 4
NFEB_EPS = 1e-5  # added to std(e) only


# ---- portrait encoder --------------------------------------------------------------------------------------------


class PerceiverAttention(nn.Module):
    """Latent queries attend to [inputs, latents]; both q and k scaled by d^-1/4, softmax in float32."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b = x.shape[0]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        scale = q.shape[-1] ** -0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).transpose(1, 2).reshape(b, latents.shape[1], -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: one input token -> `num_queries` output tokens."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
             for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FeatureProjection(nn.Module):
    """One bias-free projection per PD-FGC slice, all followed by the same LayerNorm -> 4 tokens."""

    def __init__(self, token_dim: int):
        super().__init__()
        for name, size in FEATURE_SPLIT:
            setattr(self, f"{name}_proj", nn.Linear(size, token_dim, bias=False))
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.norm(getattr(self, f"{name}_proj")(parts[name])) for name, _ in FEATURE_SPLIT], -2)


@dataclass(frozen=True)
class ResamplerSize:
    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    ff_mult: int = 4


class PortraitEncoder(nn.Module):
    """[B, F, 554] per-pixel-frame expression features -> [B, F * 24, token_dim] tokens."""

    def __init__(self, token_dim: int = 2048, mouth: ResamplerSize = ResamplerSize(),
                 emo: ResamplerSize = ResamplerSize(), mouth_queries: int = 16, emo_queries: int = 4):
        super().__init__()
        self.proj_model = FeatureProjection(token_dim)
        self.mouth_proj_model = Resampler(mouth.dim, mouth.depth, mouth.dim_head, mouth.heads, mouth_queries,
                                          dict(FEATURE_SPLIT)["mouth"], token_dim, mouth.ff_mult)
        self.emo_proj_model = Resampler(emo.dim, emo.depth, emo.dim_head, emo.heads, emo_queries,
                                        dict(FEATURE_SPLIT)["emo"], token_dim, emo.ff_mult)

    @property
    def tokens_per_frame(self) -> int:
        return len(FEATURE_SPLIT) + self.mouth_proj_model.latents.shape[1] + self.emo_proj_model.latents.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, frames, width = features.shape
        if width != FEATURE_DIM:
            raise ValueError(f"expression features have {width} values per frame, expected {FEATURE_DIM}")
        parts = dict(zip([n for n, _ in FEATURE_SPLIT], features.split([n for _, n in FEATURE_SPLIT], dim=-1)))
        projected = self.proj_model(parts)  # [B, F, 4, C]
        mouth = self.mouth_proj_model(parts["mouth"].reshape(b * frames, 1, -1))
        emo = self.emo_proj_model(parts["emo"].reshape(b * frames, 1, -1))
        tokens = torch.cat([projected, mouth.unflatten(0, (b, frames)), emo.unflatten(0, (b, frames))], dim=2)
        return tokens.flatten(1, 2)


# ---- tokens per latent frame ---------------------------------------------------------------------------------------


def pixel_frames_for(latent_frames: int) -> int:
    """Pixel frames covered by `latent_frames` latent frames of the Wan VAE (4x temporal, first frame alone)."""
    return PIXEL_FRAMES_PER_LATENT * (latent_frames - 1) + 1


def group_index(latent_frames: int, tokens_per_frame: int = 24) -> torch.Tensor:
    """[latent_frames, 4T+1] flat token index per (latent frame, slot); -1 = zero slot.

    The reference centres latent i >= 1 on the last token of pixel frame 4i and takes 2T tokens either side (the last
    token of pixel frame 4i-4 and all of frames 4i-3..4i); latent 0's range starts before the clip, so it keeps the
    T tokens of pixel frame 0 first and pads the rest with zeros at the END (split_tensor_with_padding).
    """
    t = tokens_per_frame
    half, width = 2 * t, 4 * t + 1
    index = torch.full((latent_frames, width), -1, dtype=torch.int64)
    for i in range(latent_frames):
        centre = t * (4 * i - 1) - 1
        valid = torch.arange(max(centre - half, 0), centre + half + 1)
        index[i, : len(valid)] = valid
    return index


def group_tokens(tokens: torch.Tensor, latent_frames: int, tokens_per_frame: int = 24) -> torch.Tensor:
    """[B, P*T, C] tokens of a clip's P >= 4(F-1)+1 pixel frames -> [B, F, 4T+1, C] per latent frame."""
    index = group_index(latent_frames, tokens_per_frame).to(tokens.device)
    needed = pixel_frames_for(latent_frames) * tokens_per_frame
    if tokens.shape[1] < needed:
        raise ValueError(f"{tokens.shape[1]} expression tokens cannot cover {latent_frames} latent frames "
                         f"({needed} needed)")
    padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)  # row -1 = zeros
    return padded[:, torch.where(index >= 0, index, tokens.shape[1])]


# ---- the NFEB cross-attention -----------------------------------------------------------------------------------


@dataclass
class ExpressionConditioning:
    """Expression input of one batched forward.

    tokens: [1 or B, F, 97, token_dim] grouped per latent frame (one row shared by every batch element, or one each).
    scales: ip_scale per batch element; 0 removes the expression branch exactly (and skips its attention).
    """

    tokens: torch.Tensor
    scales: tuple[float, ...]


def normalise_expression(e: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """NFEB: e' = (e - mean e) * std h / (std e + 1e-5) + mean h, scalar statistics per sample (unbiased std)."""
    dims = tuple(range(1, e.ndim))
    e32, h32 = e.float(), h.float()
    mean_e, std_e = e32.mean(dims, keepdim=True), e32.std(dims, keepdim=True)
    mean_h, std_h = h32.mean(dims, keepdim=True), h32.std(dims, keepdim=True)
    return ((e32 - mean_e) * std_h / (std_e + NFEB_EPS) + mean_h).to(e.dtype)


class FlashPortraitAttnProcessor:
    """Cross-attention of a FlashPortrait block: image (257 tokens) + text + frame-local expression (NFEB)."""

    _attention_backend = None
    _parallel_config = None

    def attend(self, q, k, v):
        return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=None).flatten(2, 3)

    @staticmethod
    def query(attn: WanAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        return attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))

    def text_and_image(self, attn: WanAttention, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """h = text attention + image attention, heads flattened. The split is at 257 image tokens."""
        heads = attn.heads
        image, text = context[:, :NUM_IMAGE_TOKENS], context[:, NUM_IMAGE_TOKENS:]
        key = attn.norm_k(attn.to_k(text)).unflatten(2, (heads, -1))
        value = attn.to_v(text).unflatten(2, (heads, -1))
        key_img = attn.norm_added_k(attn.add_k_proj(image)).unflatten(2, (heads, -1))
        value_img = attn.add_v_proj(image).unflatten(2, (heads, -1))
        return self.attend(query, key, value) + self.attend(query, key_img, value_img)

    @staticmethod
    def expression_kv(attn: WanAttention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[Bt, F, S, C] grouped tokens -> keys, values [Bt * F, S, heads, head_dim] (no key norm, as the reference)."""
        tokens = tokens.flatten(0, 1)
        return (attn.emo_k_proj(tokens).unflatten(2, (attn.heads, -1)),
                attn.emo_v_proj(tokens).unflatten(2, (attn.heads, -1)))

    def expression(self, attn: WanAttention, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Frame-local attention: the queries of latent frame f attend only to frame f's slots. -> [B, L, dim]."""
        b, length, heads, head_dim = query.shape
        frames = tokens.shape[1]
        if length % frames:
            raise ValueError(f"{length} video tokens do not split into {frames} latent frames")
        key, value = self.expression_kv(attn, tokens.to(query.dtype))
        if tokens.shape[0] != b:  # one token set shared by every batch element
            key = key.unflatten(0, (1, frames)).expand(b, -1, -1, -1, -1).flatten(0, 1)
            value = value.unflatten(0, (1, frames)).expand(b, -1, -1, -1, -1).flatten(0, 1)
        q_frames = query.reshape(b * frames, length // frames, heads, head_dim)
        return self.attend(q_frames, key, value).reshape(b, length, heads * head_dim)

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask=None, rotary_emb=None, expression: ExpressionConditioning | None = None
                 ) -> torch.Tensor:
        query = self.query(attn, hidden_states)
        out = self.text_and_image(attn, query, encoder_hidden_states)
        if expression is not None:
            rows = [i for i, s in enumerate(expression.scales) if s != 0]
            if rows:
                tokens = expression.tokens
                if tokens.shape[0] != 1:
                    tokens = tokens[rows]
                e = normalise_expression(self.expression(attn, query[rows], tokens), out[rows])
                scale = torch.tensor([expression.scales[i] for i in rows], device=out.device, dtype=out.dtype)
                e = e * scale.view(-1, 1, 1)
                if len(rows) == out.shape[0]:
                    out = out + e
                else:
                    out = out.index_add(0, torch.tensor(rows, device=out.device), e)
        out = out.type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class FlashPortraitTransformerBlock(ConditionedWanBlock):
    """A Wan block whose cross-attention also receives the per-latent-frame expression tokens."""

    condition_name = "expression"

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: int | None, emo_token_dim: int):
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        self.attn2.emo_k_proj = nn.Linear(emo_token_dim, dim, bias=False)
        self.attn2.emo_v_proj = nn.Linear(emo_token_dim, dim, bias=False)
        self.attn2.set_processor(FlashPortraitAttnProcessor())


class FlashPortraitTransformer3DModel(ConditionedWanMixin, WanTransformer3DModel):
    """Wan2.1-I2V-14B-720P + FlashPortrait's NFEB. Input: [noisy 16 | mask 4 | reference latents 16] channels."""

    _no_split_modules = ["FlashPortraitTransformerBlock"]
    _repeated_blocks = ["FlashPortraitTransformerBlock"]

    @register_to_config
    def __init__(self, patch_size=(1, 2, 2), num_attention_heads: int = 40, attention_head_dim: int = 128,
                 in_channels: int = 36, out_channels: int = 16, text_dim: int = 4096, freq_dim: int = 256,
                 ffn_dim: int = 13824, num_layers: int = 40, cross_attn_norm: bool = True,
                 qk_norm: str = "rms_norm_across_heads", eps: float = 1e-6, image_dim: int = 1280,
                 added_kv_proj_dim: int | None = None, rope_max_seq_len: int = 1024, text_len: int = 512,
                 emo_token_dim: int = 2048):
        dim = num_attention_heads * attention_head_dim
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=0,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim or dim, rope_max_seq_len=rope_max_seq_len)
        self.blocks = nn.ModuleList(
            [FlashPortraitTransformerBlock(dim, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps,
                                           added_kv_proj_dim or dim, emo_token_dim) for _ in range(num_layers)])
        # The base constructor registered num_layers=0 (it builds no Wan blocks); record the real values.
        self.register_to_config(num_layers=num_layers, added_kv_proj_dim=added_kv_proj_dim or dim)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor, expression: ExpressionConditioning | None = None
                ) -> torch.Tensor:
        """hidden_states [B, 36, F, h, w], timestep [B] (sigma * 1000), text [B, <=text_len, text_dim],
        image [B, 257, image_dim] -> flow velocity [B, 16, F, h, w]."""
        b, frames, p_t = hidden_states.shape[0], hidden_states.shape[2], self.config.patch_size[0]
        if expression is not None:
            if len(expression.scales) != b:
                raise ValueError(f"{len(expression.scales)} ip scales for batch {b}")
            if expression.tokens.shape[1] != frames // p_t:
                raise ValueError(f"expression tokens for {expression.tokens.shape[1]} latent frames, "
                                 f"window has {frames // p_t}")
        tokens, rotary_emb, e, e0, context = self.embed(hidden_states, timestep, encoder_hidden_states,
                                                        encoder_hidden_states_image)
        x = self.run_blocks(tokens, context, e0, rotary_emb, expression)
        return self.head(x, e, hidden_states.shape)
