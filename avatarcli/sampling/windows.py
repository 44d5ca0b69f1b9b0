"""The sliding-window plan: which latent frames each window denoises and how overlaps are blended.

A pure function of the video length, window length and overlap; the sampler consumes it. Differences from the
reference loop, on purpose (stableavatar.md §5.4): videos shorter than one window are planned as one full window
(the caller trims the extra frames), and the last window is full length (start = L - window) instead of a short,
zero-padded one whose audio is squeezed onto the 21-frame grid; its overlap with the previous window is then
larger than the nominal one and is blended over its whole length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLEND_SCHEMES = ("log", "uniform", "linear")


def blend_weights(overlap: int, scheme: str = "log") -> torch.Tensor:
    """Weight on the NEW window for overlap frame j (j=0 earliest); the previous window gets 1 - w.

    uniform: j / (m-1) as torch.linspace rounds it (StableAvatar's reference). linear: j / (m-1) exactly rounded
    (FlashPortrait's reference; differs from uniform by up to 3e-8). log (the paper's DWSW, best in its ablation): log1p(linspace(0,1,m) * (e-1)), which already
    spans [0, 1]. w[0] = 0 keeps the previous window's value at the first overlap frame.
    """
    if overlap <= 0:
        return torch.zeros(0)
    if overlap == 1:
        return torch.ones(1)
    if scheme == "linear":
        return torch.arange(overlap, dtype=torch.float32) / (overlap - 1)
    ramp = torch.linspace(0, 1, overlap)
    if scheme == "uniform":
        return ramp
    if scheme == "log":
        # float32 e and min-max normalisation, exactly as the reference computes it
        w = torch.log1p(ramp * (torch.exp(torch.tensor(1.0)) - 1))
        return (w - w.min()) / (w.max() - w.min())
    raise ValueError(f"unknown blend scheme {scheme!r}; choose one of {', '.join(BLEND_SCHEMES)}")


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # first latent frame
    end: int  # one past the last latent frame
    overlap: int  # latent frames shared with the previous window (0 for the first)

    @property
    def latent_frames(self) -> int:
        return self.end - self.start

    @property
    def video_frames(self) -> tuple[int, int]:
        """[first, end) video frames whose audio conditions this window (4 video frames per latent frame)."""
        return 4 * self.start, 4 * self.start + 4 * (self.latent_frames - 1) + 1


@dataclass(frozen=True)
class WindowPlan:
    latent_frames: int  # frames the sampler denoises (>= one window)
    window_frames: int
    overlap: int
    blend: str
    windows: tuple[Window, ...]

    def weights(self, window: Window) -> torch.Tensor:
        return blend_weights(window.overlap, self.blend)

    def owner(self, frame: int) -> int:
        """The last window covering a latent frame: its written value is the frame's state."""
        return max(w.index for w in self.windows if w.start <= frame < w.end)

    def writers(self, window: Window) -> list[int]:
        """Windows whose previous-step output `window` reads (the owners of its frames), ascending."""
        return sorted({self.owner(f) for f in range(window.start, window.end)})

    def final_frame_end(self, window_index: int) -> int:
        """Frames [0, end) are final once windows 0..window_index have taken their last step."""
        nxt = window_index + 1
        return self.latent_frames if nxt == len(self.windows) else self.windows[nxt].start


def latent_frames_for(video_frames: int) -> int:
    """Latent frames whose decode (4(L-1)+1 frames) covers `video_frames` frames."""
    return (max(video_frames, 1) + 2) // 4 + 1


def plan_windows(latent_frames: int, window_frames: int = 21, overlap: int = 5, blend: str = "log",
                 short: str = "pad") -> WindowPlan:
    """short: how a video shorter than one window is planned. "pad": one full window (the caller trims the extra
    frames); "shrink": one window exactly as long as the video."""
    if short not in ("pad", "shrink"):
        raise ValueError(f"unknown short-video plan {short!r}; choose pad or shrink")
    if blend not in BLEND_SCHEMES:
        raise ValueError(f"unknown blend scheme {blend!r}; choose one of {', '.join(BLEND_SCHEMES)}")
    if not 0 < overlap < window_frames:
        raise ValueError(f"overlap must be between 1 and {window_frames - 1} latent frames, got {overlap}")
    if short == "shrink" and 0 < latent_frames < window_frames:
        return WindowPlan(latent_frames, latent_frames, overlap, blend, (Window(0, 0, latent_frames, 0),))
    total = max(latent_frames, window_frames)
    starts = [0]
    while starts[-1] + window_frames < total:
        nxt = starts[-1] + window_frames - overlap
        starts.append(nxt if nxt + window_frames < total else total - window_frames)
    windows = tuple(
        Window(i, s, s + window_frames, 0 if i == 0 else starts[i - 1] + window_frames - s)
        for i, s in enumerate(starts)
    )
    return WindowPlan(total, window_frames, overlap, blend, windows)
