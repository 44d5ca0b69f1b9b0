"""The VAE's causal streaming regime as training runs it: clips encoded and decoded piece by piece, the encoder's and
decoder's feature caches carried from piece to piece exactly as one whole-video encode / one streaming decode
(avatarcli.decode.stream) carries them at inference."""

from __future__ import annotations

import torch


class CausalStream:
    """The causal feature caches of one video batch streamed through the VAE, kept across calls.

    What diffusers' AutoencoderKLWan keeps in `_enc_feat_map` / `_feat_map` during ONE encode / decode call, held
    here so a video can be encoded and decoded in pieces: the first video frame is one encoder chunk, every later 4
    frames one more (one latent frame each); the decoder takes one latent frame at a time (`first_chunk` on the first
    of the video). Pieces encoded or decoded through one stream equal one `vae.encode` / `vae.decode` of the whole
    (decode: before its final clamp), and decoding equals avatarcli.decode.stream.StreamingDecoder."""

    def __init__(self, vae):
        self.vae = vae
        self.encoder_cache: list = [None] * vae._cached_conv_counts["encoder"]
        self.decoder_cache: list = [None] * vae._cached_conv_counts["decoder"]
        self.frames_in = 0  # video frames encoded so far
        self.latents_out = 0  # latent frames decoded so far

    def detach(self) -> None:
        """Cut the graph at the caches (truncated backprop: later pieces get no gradient into earlier ones)."""
        self.encoder_cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.encoder_cache]
        self.decoder_cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.decoder_cache]

    def encode(self, x: torch.Tensor):
        """The next video frames [B, 3, F, H, W] -> DiagonalGaussianDistribution of their latent frames."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        first = 1 if self.frames_in == 0 else 0
        if x.shape[2] == 0 or (x.shape[2] - first) % 4:
            raise ValueError(f"{x.shape[2]} frames after {self.frames_in} do not fill whole 4-frame chunks")
        bounds = ([0, 1] if first else [0]) + list(range(first + 4, x.shape[2] + 1, 4))
        out = [self.vae.encoder(x[:, :, a:b], feat_cache=self.encoder_cache, feat_idx=[0])
               for a, b in zip(bounds[:-1], bounds[1:])]
        self.frames_in += x.shape[2]
        return DiagonalGaussianDistribution(self.vae.quant_conv(torch.cat(out, dim=2)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The next latent frames [B, 16, n, h, w] (unnormalised) -> video frames, NOT clamped to [-1, 1]."""
        hidden = self.vae.post_quant_conv(z)  # 1x1x1: per chunk as StreamingDecoder runs it
        frames = []
        for i in range(hidden.shape[2]):
            frames.append(self.vae.decoder(hidden[:, :, i : i + 1], feat_cache=self.decoder_cache, feat_idx=[0],
                                           first_chunk=self.latents_out == 0))
            self.latents_out += 1
        return torch.cat(frames, dim=2)


def decode_for_training(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z).sample` without its final clamp to [-1, 1]: a clamped output gets no gradient, so a pixel pushed
    past the range by one update could never come back. Same causal per-latent-frame loop as diffusers' _decode."""
    return CausalStream(vae).decode(z)


def video_frames(latent_frames: int) -> int:
    """Video frames of the first `latent_frames` latent frames of a video (1, then 4 each)."""
    return 0 if latent_frames == 0 else 4 * (latent_frames - 1) + 1


def vae_piece(stream: CausalStream, x: torch.Tensor, train_encoder: bool, sample: bool = True):
    """The next frames x [B, 3, F, H, W] of the streamed clips through encoder and decoder, caches carried on:
    (unclamped reconstruction, posterior). Latents are drawn from the posterior (its mode if not `sample`)."""
    with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
        posterior = stream.encode(x)
    z = posterior.mean + posterior.std * torch.randn_like(posterior.std) if sample else posterior.mode()
    return stream.decode(z), posterior
