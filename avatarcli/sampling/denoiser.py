"""The window denoiser: (window, step, latents) -> guided velocity, one batched forward of all guidance branches.

`WindowDenoiser` is shared by every driver. It owns what does not depend on the conditioning signal:
  * the timesteps (sigma * 1000 of the schedule) and the step count;
  * the branch batching: text, CLIP tokens and the reference condition are cast, padded and batched once per job,
    the window's latents are repeated per branch and concatenated with the condition;
  * a bounded per-window cache of the window's own conditioning (audio features, expression tokens), computed at
    the window's first call and dropped after its last step. A window whose last steps are predicted never reaches
    that drop; since at most `steps + 2` windows are live in the wavefront, older entries are finished and evicted
    (recomputing one would give the same conditioning), so the cache stays bounded with step prediction on;
  * the DiT's time, charged to the clock's "dit" stage when a clock is given (the driver charges its per-window
    feature work to "features" itself).
A driver's subclass supplies `window_conditioning(window)`, `conditioning_rows` (the same for a subset of the
branches: guidance reuse runs the conditional branch alone) and, where the guidance has its own name for it, the
branch list. `branch_forwards` counts the branches of every forward; a `recorder` (sampling/trace.py), when set, is
told of each. `StableAvatarDenoiser` (audio) lives here; FlashPortrait's is in sampling/flashportrait.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from avatarcli.models.stableavatar import AudioConditioning, StableAvatarTransformer3DModel
from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.windows import Window


class WindowCache:
    """Per-window values, at most `limit` of them (the oldest evicted first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[int, Any] = {}

    def get(self, index: int, make: Callable[[], Any]) -> Any:
        if index not in self.entries:
            self.entries[index] = make()
            while len(self.entries) > self.limit:
                del self.entries[next(iter(self.entries))]
        return self.entries[index]

    def drop(self, index: int) -> None:
        self.entries.pop(index, None)

    def __len__(self) -> int:
        return len(self.entries)


class WindowDenoiser:
    """The shared window denoiser; subclasses give `window_conditioning` (see the module docstring).

    `prompts`: per branch, "positive" or "negative"; `texts`: those embeddings [1, L, text_dim] (L <= text_len);
    `image_tokens` [1, 257, image_dim]; `condition` [1, 20, F_window, h, w] (mask + reference latents);
    `device`/`dtype`: where the model's inputs go (default: the model's own; give them when it is offloaded).
    """

    def __init__(self, model: Any, guidance: Any, *, prompts: list[str], texts: dict[str, torch.Tensor | None],
                 image_tokens: torch.Tensor, condition: torch.Tensor, sigmas: torch.Tensor, steps: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, clock: Any = None):
        self.model, self.guidance, self.clock = model, guidance, clock
        self.timesteps = sigmas[:-1] * 1000
        self.steps = steps if steps is not None else len(self.timesteps)
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype or model.dtype
        self.branches = len(prompts)
        self.text = torch.cat([model.pad_text(texts[p]) for p in prompts]).to(self.device, self.dtype)
        self.image = image_tokens.to(self.device, self.dtype).expand(self.branches, -1, -1)
        self.condition = condition.to(self.device, self.dtype).expand(self.branches, -1, -1, -1, -1)
        self.cache = WindowCache(self.steps + 2)
        self.branch_forwards = 0  # over all forwards, the branches each ran (a full-guidance forward counts all)
        self.recorder = None  # a sampling.trace.ForwardRecorder told of every forward, when the run is traced
        self.branch_batch: int | None = None  # at most this many branches per forward (None: all in one)

    def window_conditioning(self, window: Window) -> Any:
        """The model's per-window conditioning input for all branches (computed once per window)."""
        raise NotImplementedError

    def conditioning_for(self, window: Window) -> Any:
        return self.cache.get(window.index, lambda: self.window_conditioning(window))

    def conditioning_rows(self, conditioning: Any, rows: list[int]) -> Any:
        """The per-window conditioning of the branches `rows` only (a forward of fewer branches)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        return self.guidance.combine(self.branch_predictions(window, step, latents)).to(latents.device)

    @torch.no_grad()
    def branch_predictions(self, window: Window, step: int, latents: torch.Tensor,
                           rows: list[int] | None = None) -> torch.Tensor:
        """The float32 predictions [len(rows), ...] of the branches `rows` (default: all), in one forward, or in
        forwards of at most `branch_batch` branches where memory is short (avatarcli/budget.py)."""
        conditioning = self.conditioning_for(window)
        every = list(range(self.branches)) if rows is None else rows
        size = self.branch_batch or len(every)
        if len(every) <= size:
            pred = self.forward(window, step, latents, conditioning, rows)
        else:
            pred = torch.cat([self.forward(window, step, latents, conditioning, every[i : i + size])
                              for i in range(0, len(every), size)])
        self.branch_forwards += len(every)
        if self.recorder is not None:
            self.recorder.forward(window.index, step, every)
        if step == self.steps - 1:
            self.cache.drop(window.index)
        return pred

    def forward(self, window: Window, step: int, latents: torch.Tensor, conditioning: Any,
                rows: list[int] | None) -> torch.Tensor:
        """One batched forward of the branches `rows` (None: all, with the conditioning as computed)."""
        n, frames = self.branches, latents.shape[2]
        text, image, condition = self.text, self.image, self.condition
        if rows is not None:
            n, conditioning = len(rows), self.conditioning_rows(conditioning, rows)
            text, image, condition = text[rows], image[rows], condition[rows]
        x = torch.cat([latents.to(self.device, self.dtype).expand(n, -1, -1, -1, -1),
                       condition[:, :, :frames]], dim=1)
        t = self.timesteps[step].expand(n).to(self.device)
        with self.clock("dit") if self.clock is not None else nullcontext():
            pred = self.model(x, t, text, image, conditioning)
        return pred.float()


class StableAvatarDenoiser(WindowDenoiser):
    """The audio driver's window denoiser: each window's wav2vec2 features, one row per distinct audio input of the
    guidance branches (real, or zeroed for "silent"); "none" branches drop the adapter output."""

    def __init__(self, model: StableAvatarTransformer3DModel, guidance: Guidance, *, positive_text: torch.Tensor,
                 negative_text: torch.Tensor, image_tokens: torch.Tensor, condition: torch.Tensor,
                 window_audio: Callable[[Window], torch.Tensor], sigmas: torch.Tensor, steps: int | None = None,
                 clock: Any = None):
        """window_audio(window) -> [1, T_a, 768]."""
        branches = guidance.branches
        super().__init__(model, guidance, prompts=[b.prompt for b in branches],
                         texts={"positive": positive_text, "negative": negative_text}, image_tokens=image_tokens,
                         condition=condition, sigmas=sigmas, steps=steps, clock=clock)
        self.window_audio = window_audio
        self.audio_rows = [a for a in ("real", "silent") if any(b.audio == a for b in branches)]
        self.branch_audio = [self.audio_rows.index(b.audio) if b.audio != "none" else None for b in branches]

    def window_conditioning(self, window: Window) -> AudioConditioning:
        real = self.window_audio(window)
        features = torch.cat([real if r == "real" else torch.zeros_like(real) for r in self.audio_rows])
        return AudioConditioning(features, self.branch_audio)

    def audio_for(self, window: Window) -> AudioConditioning:
        return self.conditioning_for(window)

    def conditioning_rows(self, conditioning: AudioConditioning, rows: list[int]) -> AudioConditioning:
        used = sorted({conditioning.branch_audio[r] for r in rows} - {None})
        audio = [conditioning.branch_audio[r] for r in rows]
        if not used:  # branches without audio context only: the adapter runs on any row, its output is zeroed
            features = conditioning.features[:1]
            return AudioConditioning(features.expand(len(rows), *features.shape[1:]), audio)
        return AudioConditioning(conditioning.features[used], [None if a is None else used.index(a) for a in audio])
