"""Guidance: which branches one batched forward holds, and how their predictions combine.

Both StableAvatar modes cost 3 branches per window-step, run as ONE batched forward (branch index = batch index).
  cfg: the public code's text/audio CFG (stableavatar.md §4.2)
       b0 = negative prompt, no audio context | b1 = negative prompt, audio | b2 = positive prompt, audio
       v = b0 + s_audio (b1 - b0) + s_text (b2 - b1)
  ang: the paper's Audio Native Guidance (§4.1, Eqs. 5-10), positive prompt in every branch
       b0 = full | b1 = audio features zeroed before the adapter | b2 = adapter output dropped
       v = (1 + a + b) b0 - a b1 - b b2
Both are affine in the branches with weights summing to 1, so v = b_cond + (a fixed mix of the differences): guidance
reuse (sampling/guidance_reuse.py) holds or extrapolates that mix and runs the conditional branch alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # presets read the names below before torch is loaded
    import torch

# The guidance rules, each named once here.
AUDIO_GUIDANCE = ("cfg", "ang")  # StableAvatar (--audio): combined by `Guidance` below
EXPRESSION_GUIDANCE = "expression"  # FlashPortrait (--driving): expression CFG, sampling/flashportrait.py
# What a preset's (and --guidance's) `guidance` may name.
PRESET_GUIDANCE = (*AUDIO_GUIDANCE, EXPRESSION_GUIDANCE)
# What `Guidance.mode` takes: a StableAvatar rule, or "none", one unguided branch (benchmarks, training checks).
GUIDANCE_MODES = (*AUDIO_GUIDANCE, "none")

Prompt = Literal["positive", "negative"]
Audio = Literal["real", "silent", "none"]  # silent: zero wav2vec features; none: zero adapter output


@dataclass(frozen=True)
class Branch:
    prompt: Prompt
    audio: Audio


@dataclass(frozen=True)
class Guidance:
    mode: str = "cfg"
    text_scale: float = 3.0
    audio_scale: float = 5.0
    alpha: float = 4.5
    beta: float = 3.0

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {self.mode!r}; choose one of {', '.join(GUIDANCE_MODES)}")

    @property
    def branches(self) -> tuple[Branch, ...]:
        if self.mode == "cfg":
            return Branch("negative", "none"), Branch("negative", "real"), Branch("positive", "real")
        if self.mode == "ang":
            return Branch("positive", "real"), Branch("positive", "silent"), Branch("positive", "none")
        return (Branch("positive", "real"),)

    @property
    def conditional(self) -> int:
        """The branch index of the fully conditioned prediction (positive prompt, real audio), the one that guidance
        reuse (sampling/guidance_reuse.py) runs alone."""
        return 2 if self.mode == "cfg" else 0

    def combine(self, pred: torch.Tensor) -> torch.Tensor:
        """[branches, ...] -> [1, ...] guided velocity."""
        if self.mode == "cfg":
            b0, b1, b2 = pred.chunk(3)
            return b0 + self.audio_scale * (b1 - b0) + self.text_scale * (b2 - b1)
        if self.mode == "ang":
            b0, b1, b2 = pred.chunk(3)
            return (1 + self.alpha + self.beta) * b0 - self.alpha * b1 - self.beta * b2
        return pred
