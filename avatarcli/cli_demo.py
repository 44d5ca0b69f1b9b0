"""`avatarcli demo-face`: a portrait (and optionally speech and the ground-truth video) of the synthetic demo world."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avatarcli.errors import AvatarError


def register(app: typer.Typer) -> None:
    @app.command("demo-face")
    def demo_face(
        output: Path = typer.Option(..., "-o", "--output", help="Portrait PNG to write (128x128)."),
        seed: int = typer.Option(0, "--seed", help="Which person of the demo world."),
        speech: Optional[Path] = typer.Option(None, "--speech", help="Also write synthetic speech (16 kHz WAV) here."),
        seconds: float = typer.Option(10.0, "--seconds", help="Length of --speech."),
        video: Optional[Path] = typer.Option(None, "--video", help="Also write the world's own rendering of this "
                                             "person speaking --speech (ground truth for eval), as mp4."),
    ) -> None:
        """Write a portrait of the synthetic demo world (for `animate --model demo`)."""
        from avatarcli.demo import world
        from avatarcli.media.audio import write_wav
        from avatarcli.sink.ffmpeg import check_writable_output

        if output.suffix.lower() != ".png":
            raise AvatarError(f"-o must name a .png file, got {output}")
        if video is not None and speech is None:
            raise AvatarError("--video renders the person speaking --speech; give --speech too")
        if not 0 < seconds <= 3600:
            raise AvatarError(f"--seconds must be in (0, 3600], got {seconds}")
        for path in (output, speech, video):
            if path is not None:
                check_writable_output(path)
        _write_atomic(output, lambda tmp: world.portrait(seed).save(tmp, format="PNG"))
        written = [output]
        if speech is not None:
            samples = world.speech(seed, seconds)
            _write_atomic(speech, lambda tmp: write_wav(tmp, samples))
            written.append(speech)
            if video is not None:
                _write_video(video, world.render_video(seed, samples, motion_seed=seed), speech)
                written.append(video)
        typer.echo(" ".join(str(p) for p in written))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_video(path: Path, frames, audio: Path) -> None:
    from avatarcli.demo.world import FPS, SIZE
    from avatarcli.sink.ffmpeg import Mp4Sink

    sink = Mp4Sink(path, SIZE, SIZE, FPS, audio_path=audio, crf=10)
    sink.open()
    try:
        sink.write(frames)
        sink.close()
    except BaseException:
        sink.abort()
        raise
