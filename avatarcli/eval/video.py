"""Read a video frame by frame through the bundled ffmpeg (imageio-ffmpeg): uint8 RGB [H, W, 3], never all at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError
from avatarcli.media.video import VideoInfo


class VideoReader:
    """Opens `path` at once (a missing or unreadable file is an AvatarError here) and yields its frames.

    `info` holds what the header gives (path, size, fps); the frames are not counted.
    """

    def __init__(self, path: str | Path, what: str = "video") -> None:
        import imageio_ffmpeg

        from avatarcli.media.audio import ffmpeg_exe

        self.path = Path(path)
        if not self.path.exists():
            raise AvatarError(f"{what} not found: {self.path}; check the path")
        if self.path.is_dir():
            raise AvatarError(f"{what} path is a folder, not a video file: {self.path}")
        ffmpeg_exe()  # a clear error when ffmpeg itself is missing
        self._frames = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
        try:
            meta = next(self._frames)
        except (OSError, RuntimeError, StopIteration) as error:
            self._frames.close()
            raise AvatarError(f"cannot read {what} {self.path}: not a video file ffmpeg can decode") from error
        width, height = meta["size"]
        fps = float(meta.get("fps") or 0.0)
        if fps <= 0:
            self._frames.close()
            raise AvatarError(f"cannot read {what} {self.path}: it has no frame rate (is it a still image?)")
        self.info = VideoInfo(self.path, int(width), int(height), fps)

    def __iter__(self) -> Iterator[np.ndarray]:
        w, h = self.info.width, self.info.height
        try:
            for raw in self._frames:
                yield np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
        except (OSError, RuntimeError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise AvatarError(f"cannot read video {self.path}: decoding failed ({first_line})") from error
        finally:
            self._frames.close()

    def close(self) -> None:
        self._frames.close()
