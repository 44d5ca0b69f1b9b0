"""Spatial tiles for the streaming decode: one latent frame through the Wan VAE decoder as overlapping tiles.

Each tile keeps its own causal cache (the decoder is causal in time only, so a tile's stream is the full stream of a
smaller video), and the decoded tiles are blended with linear ramps across their overlaps. The working memory is
one tile's instead of the whole frame's; the caches together cover the frame (overlaps twice), as the full decode's.
The result is not the full decode: the convolutions see zero padding at a tile's inner edges, and the decoder's
attention (at the latent resolution) sees its tile only; the blend hides the seams. tests/test_memory_budget.py
states the measured difference. The same scheme as diffusers' `AutoencoderKLWan.tiled_decode`, but streaming: that
one decodes each tile over the whole video before blending, this one frame by frame with the caches carried.
"""

from __future__ import annotations

import torch

from avatarcli.budget import tile_spans


def ramp(length: int, before: int, after: int) -> torch.Tensor:
    """Blend weights [length] along one side of a tile: rising over its first `before` pixels (shared with the tile
    before), falling over its last `after` (shared with the tile after), 1 elsewhere; a neighbour's ramp over the same
    pixels is the complement."""
    weights = torch.ones(length, dtype=torch.float32)
    if before:
        weights[:before] = (torch.arange(before, dtype=torch.float32) + 0.5) / before
    if after:
        weights[length - after :] = (after - 0.5 - torch.arange(after, dtype=torch.float32)) / after
    return weights


def side_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """The ramp of each span (latent units) at the output resolution (`scale` pixels per latent pixel)."""
    weights = []
    for index, (start, end) in enumerate(spans):
        before = spans[index - 1][1] - start if index > 0 else 0
        after = end - spans[index + 1][0] if index + 1 < len(spans) else 0
        weights.append(ramp((end - start) * scale, before * scale, after * scale))
    return weights


class TiledFrames:
    """Decode latent frames (after post_quant_conv) [1, C, 1, h, w] tile by tile, each tile with its own cache."""

    def __init__(self, decoder: torch.nn.Module, cache_size: int, tiles: tuple[int, int], height: int, width: int,
                 scale: int) -> None:
        self.decoder, self.scale = decoder, scale
        rows, cols = tile_spans(height, tiles[0]), tile_spans(width, tiles[1])
        row_weights, col_weights = side_weights(rows, scale), side_weights(cols, scale)
        self.tiles = [(r, c, row_weights[i][:, None] * col_weights[j][None, :])
                      for i, r in enumerate(rows) for j, c in enumerate(cols)]
        self.caches: list[list] = [[None] * cache_size for _ in self.tiles]
        total = torch.zeros(height * scale, width * scale)
        for (r0, r1), (c0, c1), weight in self.tiles:
            total[r0 * scale : r1 * scale, c0 * scale : c1 * scale] += weight
        self.total = total

    def __call__(self, hidden: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """The blended float32 video [1, 3, T, H, W] of one latent frame."""
        if self.total.device != hidden.device:
            self.tiles = [(r, c, weight.to(hidden.device)) for r, c, weight in self.tiles]
            self.total = self.total.to(hidden.device)
        s, canvas = self.scale, None
        for ((r0, r1), (c0, c1), weight), cache in zip(self.tiles, self.caches):
            video = self.decoder(hidden[:, :, :, r0:r1, c0:c1], feat_cache=cache, feat_idx=[0],
                                 first_chunk=first_chunk)
            if canvas is None:
                canvas = video.new_zeros((*video.shape[:3], *self.total.shape), dtype=torch.float32)
            canvas[..., r0 * s : r1 * s, c0 * s : c1 * s] += video.float() * weight
        return canvas / self.total
