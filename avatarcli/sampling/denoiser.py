"""The StableAvatar window denoiser: one batched guided forward per window-step.

Conditioning that does not depend on the step (text, CLIP tokens, the reference-image latents, each window's
wav2vec2 features) is prepared once; audio features are computed once per window and dropped when the window
has taken its last step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from avatarcli.models.stableavatar import AudioConditioning, StableAvatarTransformer3DModel
from avatarcli.sampling.guidance import Guidance
from avatarcli.sampling.windows import Window


class StableAvatarDenoiser:
    def __init__(self, model: StableAvatarTransformer3DModel, guidance: Guidance, *, positive_text: torch.Tensor,
                 negative_text: torch.Tensor, image_tokens: torch.Tensor, condition: torch.Tensor,
                 window_audio: Callable[[Window], torch.Tensor], sigmas: torch.Tensor, steps: int | None = None):
        """positive/negative_text [1, L, text_dim] (L <= text_len), image_tokens [1, 257, image_dim],
        condition [1, 20, F_window, h, w] (mask + reference latents), window_audio(window) -> [1, T_a, 768]."""
        self.model, self.guidance = model, guidance
        self.window_audio = window_audio
        self.timesteps = sigmas[:-1] * 1000
        self.steps = steps if steps is not None else len(self.timesteps)
        branches = guidance.branches
        device, self.dtype = model.device, model.dtype
        texts = {"positive": model.pad_text(positive_text), "negative": model.pad_text(negative_text)}
        # Cast and batch the step-independent conditioning once, not per window-step.
        self.text = torch.cat([texts[b.prompt] for b in branches]).to(device, self.dtype)
        self.image = image_tokens.to(device, self.dtype).expand(len(branches), -1, -1)
        self.condition = condition.to(device, self.dtype).expand(len(branches), -1, -1, -1, -1)
        rows = [a for a in ("real", "silent") if any(b.audio == a for b in branches)]
        self.audio_rows = rows
        self.branch_audio = [rows.index(b.audio) if b.audio != "none" else None for b in branches]
        self._audio: dict[int, torch.Tensor] = {}

    def audio_for(self, window: Window) -> AudioConditioning:
        if window.index not in self._audio:
            self._audio[window.index] = self.window_audio(window)
            # A window whose last steps are predicted never reaches the drop below; at most steps + 2 windows are
            # live in the wavefront, so older entries are finished (recomputing one would give the same features).
            while len(self._audio) > self.steps + 2:
                del self._audio[next(iter(self._audio))]
        real = self._audio[window.index]
        features = torch.cat([real if r == "real" else torch.zeros_like(real) for r in self.audio_rows])
        return AudioConditioning(features, self.branch_audio)

    def __call__(self, window: Window, step: int, latents: torch.Tensor) -> torch.Tensor:
        n = len(self.branch_audio)
        frames = latents.shape[2]
        x = torch.cat([latents.to(self.dtype).expand(n, -1, -1, -1, -1), self.condition[:, :, :frames]], dim=1)
        t = self.timesteps[step].expand(n).to(latents.device)
        pred = self.model(x, t, self.text, self.image, self.audio_for(window))
        if step == self.steps - 1:
            self._audio.pop(window.index, None)
        return self.guidance.combine(pred.float())
