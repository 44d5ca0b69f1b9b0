"""FlashPortrait's sampling pieces: window plan, expression guidance, the window denoiser, frame and size helpers.

The loop itself is the shared one (sampling/sampler.py); the schedule is the shared flow-matching Euler schedule
(shift 5, 30 steps). What is FlashPortrait's own (flashportrait.md §5):
  * windows of 51 latent frames, overlap 30, linear blend w_j = j/(n-1) on the Euler-stepped latents; the last window
    is shifted back to end at the video's end. Videos shorter than one window get one window of their own length
    (the reference wraps indices and mis-aligns the expression tokens there);
  * expression CFG: v = v(ip=0) + s_emo (v(ip=1) - v(ip=0)), optionally text CFG as a third branch;
  * each window's expression tokens are its pixel frames [4 first, 4 last] encoded as a fresh clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from avatarcli.errors import AvatarError
from avatarcli.models.flashportrait import (
    ExpressionConditioning,
    FlashPortraitTransformer3DModel,
    PortraitEncoder,
    group_tokens,
    pixel_frames_for,
)
from avatarcli.models.windows import FLASHPORTRAIT_OVERLAP as OVERLAP_LATENT_FRAMES
from avatarcli.models.windows import FLASHPORTRAIT_WINDOW as WINDOW_LATENT_FRAMES
from avatarcli.sampling.denoiser import WindowDenoiser
from avatarcli.sampling.windows import Window, WindowPlan, plan_windows

STEPS = 30
SHIFT = 5.0
MAX_SIZE = 720
SIZE_MULTIPLE = 16


def plan_flashportrait_windows(latent_frames: int, window_frames: int = WINDOW_LATENT_FRAMES,
                               overlap: int = OVERLAP_LATENT_FRAMES) -> WindowPlan:
    """Starts 0, 21, 42, ... while start < L - overlap, the last window moved back to [L - 51, L); linear blend."""
    if latent_frames < 1:
        raise ValueError("a video needs at least one latent frame")
    return plan_windows(latent_frames, window_frames, overlap, blend="linear", short="shrink")


# ---- frames -----------------------------------------------------------------------------------------------------


def latent_frames_for_driving(driving_frames: int) -> int:
    """Latent frames for an output of `driving_frames` frames: the decoded clip's frame 0 is the reference-image slot
    and is dropped, so 4(L-1)+1 >= driving_frames + 1."""
    if driving_frames < 1:
        raise ValueError("the driving video needs at least one frame")
    return math.ceil(driving_frames / 4) + 1


def pixel_features_for_driving(features: torch.Tensor) -> torch.Tensor:
    """[..., N, 554] per driving frame -> [..., 4(L-1)+1, 554] per generated pixel frame, L from the frame count.

    Output frame k (generated pixel frame k+1) is driven by driving frame k, so the output keeps the driving video's
    frame count and timing; pixel frame 0 (the dropped reference slot) takes driving frame 0, and the tail the last
    frame. (The reference drives pixel frame p by driving frame p and drops frame 0, losing the first driving frame
    and up to 3 at the end.)
    """
    n = features.shape[-2]
    total = pixel_frames_for(latent_frames_for_driving(n))
    index = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(n),
                       torch.full((total - n - 1,), n - 1, dtype=torch.long)])
    return features.index_select(-2, index.to(features.device))


def output_frames(decoded_frames: int, driving_frames: int) -> slice:
    """Which decoded pixel frames are the output: 1 .. driving_frames."""
    if decoded_frames < driving_frames + 1:
        raise ValueError(f"{decoded_frames} decoded frames cannot give {driving_frames} output frames")
    return slice(1, driving_frames + 1)


def reference_size(width: int, height: int, max_size: int = MAX_SIZE, size: tuple[int, int] | None = None
                   ) -> tuple[int, int]:
    """(width, height) of the generated video: the longer side scaled to `max_size`, each side rounded up to a
    multiple of 16 (as the reference), or an explicit `size` (both sides multiples of 16)."""
    if size is not None:
        w, h = size
        if w <= 0 or h <= 0 or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
            raise AvatarError(f"--size {w}x{h}: both sides must be positive multiples of {SIZE_MULTIPLE}")
        return w, h
    if width <= 0 or height <= 0:
        raise AvatarError(f"the reference image has no pixels ({width}x{height})")
    if max_size < SIZE_MULTIPLE:
        raise AvatarError(f"max_size {max_size} is below {SIZE_MULTIPLE}")
    scale = max_size / max(width, height)

    def up(side: float) -> int:
        return max(SIZE_MULTIPLE, math.ceil(round(side * scale) / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    return up(width), up(height)


def resize_portrait(image, max_size: int = MAX_SIZE, size: tuple[int, int] | None = None):
    """The PIL portrait resized to `reference_size` with LANCZOS, as the reference does (whole image, no face crop).

    Pass the result to features.image.reference_condition / clip_features with its own size: their bicubic resize
    to the same size is then the identity."""
    from PIL import Image

    width, height = reference_size(image.width, image.height, max_size, size)
    return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)


# ---- guidance -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpressionBranch:
    prompt: str  # "positive" | "negative"
    ip_scale: float


@dataclass(frozen=True)
class ExpressionGuidance:
    """Expression CFG (2 branches); text CFG adds a third (negative prompt, no expression) when text_scale != 1.

    Branch order as the reference calls them: emo on, emo off[, negative text emo off].
    """

    emo_scale: float = 4.0
    text_scale: float = 1.0
    ip_scale: float = 1.0

    @property
    def branches(self) -> tuple[ExpressionBranch, ...]:
        on, off = ExpressionBranch("positive", self.ip_scale), ExpressionBranch("positive", 0.0)
        return (on, off) if self.text_scale == 1.0 else (on, off, ExpressionBranch("negative", 0.0))

    @property
    def conditional(self) -> int:
        """The branch with the expression on (what guidance reuse runs alone)."""
        return 0

    def combine(self, pred: torch.Tensor) -> torch.Tensor:
        """[branches, ...] -> [1, ...] guided velocity."""
        if self.text_scale == 1.0:
            on, off = pred.chunk(2)
            return off + self.emo_scale * (on - off)
        on, off, neg = pred.chunk(3)
        return neg + self.text_scale * (off - neg) + self.emo_scale * (on - off)


# ---- the window denoiser ------------------------------------------------------------------------------------------


def window_expression_tokens(encoder: PortraitEncoder, pixel_features: torch.Tensor, window: Window
                             ) -> torch.Tensor:
    """A window's grouped tokens [1, F, 97, C]: its pixel frames [4 first, 4 last] encoded as a fresh clip."""
    start, end = window.video_frames
    if pixel_features.shape[1] < end:
        raise ValueError(f"expression features cover {pixel_features.shape[1]} pixel frames, window {window.index} "
                         f"needs {end}")
    param = next(encoder.parameters())
    tokens = encoder(pixel_features[:, start:end].to(param.device, param.dtype))
    return group_tokens(tokens, window.latent_frames, encoder.tokens_per_frame)


class FlashPortraitDenoiser(WindowDenoiser):
    """(window, step, latents) -> guided velocity; all guidance branches in one batched forward (the shared
    WindowDenoiser). A window's expression tokens are encoded at its first step and kept in the bounded cache."""

    def __init__(self, model: FlashPortraitTransformer3DModel, guidance: ExpressionGuidance, *,
                 positive_text: torch.Tensor, negative_text: torch.Tensor | None, image_tokens: torch.Tensor,
                 condition: torch.Tensor, window_tokens: Callable[[Window], torch.Tensor], sigmas: torch.Tensor,
                 steps: int | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 clock: Any = None):
        """window_tokens(window) -> [1, F, 97, C]; the rest as WindowDenoiser."""
        branches = guidance.branches
        if any(b.prompt == "negative" for b in branches) and negative_text is None:
            raise ValueError("text guidance needs a negative prompt embedding")
        super().__init__(model, guidance, prompts=[b.prompt for b in branches],
                         texts={"positive": positive_text, "negative": negative_text}, image_tokens=image_tokens,
                         condition=condition, sigmas=sigmas, steps=steps, device=device, dtype=dtype, clock=clock)
        self.window_tokens = window_tokens
        self.scales = tuple(b.ip_scale for b in branches)

    def window_conditioning(self, window: Window) -> ExpressionConditioning:
        return ExpressionConditioning(self.window_tokens(window).to(self.device, self.dtype), self.scales)

    def expression_for(self, window: Window) -> ExpressionConditioning:
        return self.conditioning_for(window)

    def conditioning_rows(self, conditioning: ExpressionConditioning, rows: list[int]) -> ExpressionConditioning:
        tokens = conditioning.tokens if conditioning.tokens.shape[0] == 1 else conditioning.tokens[rows]
        return ExpressionConditioning(tokens, tuple(conditioning.scales[r] for r in rows))
