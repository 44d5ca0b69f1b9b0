"""Context parallelism of one transformer forward (a very long window): diffusers' Ulysses attention.

`enable_context_parallel(transformer, degree)` applies diffusers' `ContextParallelConfig(ulysses_degree=degree)`
with a plan for avatarcli's Wan subclasses: the video tokens (and their RoPE) are split along the sequence before
the first block and gathered after the output projection; self-attention exchanges heads for sequence with an
all-to-all (Ulysses), so each rank attends over the whole window with `heads / degree` heads. Cross-attention needs
nothing: the text and CLIP keys are whole on every rank.

StableAvatar's per-latent-frame audio context is split along the frames with the tokens, so each rank's queries meet
their own frames' audio: the window's latent frames must divide by the degree (21 frames: 3 or 7), and the heads
too (12 in the 1.3B model: 2, 3, 4, 6). FlashPortrait's expression block normalises with statistics over the whole
sequence, which a split would change, so it is refused.
"""

from __future__ import annotations

import torch

from avatarcli.errors import AvatarError


def context_parallel_plan() -> dict:
    """The split/gather plan for the StableAvatar transformer (diffusers' Wan plan plus the audio context)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "rope": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
                 1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},
        "blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        # [B, latent frames, audio tokens, dim]: every block receives the whole context, so each splits it.
        "blocks.*": {"condition": ContextParallelInput(split_dim=1, expected_dims=4, split_output=False)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def check_context_parallel(transformer: torch.nn.Module, degree: int, latent_frames: int) -> None:
    """Raise AvatarError when `degree` cannot split this transformer's windows of `latent_frames` frames."""
    from avatarcli.models.stableavatar import StableAvatarTransformer3DModel

    if not isinstance(transformer, StableAvatarTransformer3DModel):
        raise AvatarError("context parallelism is for the audio driver (StableAvatar): FlashPortrait's expression "
                          "block normalises over the whole window, which splitting it would change")
    heads = transformer.config.num_attention_heads
    if heads % degree or latent_frames % degree:
        raise AvatarError(f"context parallelism over {degree} processes needs the {heads} attention heads and the "
                          f"{latent_frames} latent frames of a window to divide by {degree}")


def enable_context_parallel(transformer: torch.nn.Module, degree: int, mesh=None) -> None:
    """Split every forward of `transformer` over `degree` ranks (Ulysses). `mesh`: a 2-dim device mesh named
    ("ring", "ulysses") when the ranks are a subset of the launch (composed with window parallelism)."""
    from diffusers import ContextParallelConfig

    from avatarcli.runtime import quiet_diffusers

    with quiet_diffusers():  # the experimental-feature warning
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh),
                                       cp_plan=context_parallel_plan())
