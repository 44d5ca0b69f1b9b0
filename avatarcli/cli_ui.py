"""`avatarcli ui`: serve the local web app (avatarcli/ui, the optional `ui` extra) until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avatarcli.errors import AvatarError, Interrupted


def register(app: typer.Typer) -> None:
    @app.command("ui")
    def ui(
        host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on (0.0.0.0: every interface; "
                                 "the page has no login)."),
        port: int = typer.Option(7860, "--port", help="Port to serve on."),
        share: bool = typer.Option(False, "--share", help="Also publish the page through a public Gradio link "
                                   "(off unless asked)."),
        weights: Optional[Path] = typer.Option(None, "--weights", help="The official weights folder the page "
                                               "offers [default: the Hugging Face cache]."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        save_every: float = typer.Option(10.0, "--save-every", help="Seconds of work between saves of a job's "
                                         "state: each save adds the frames finished since to the page's preview."),
    ) -> None:
        """Serve the web app: portrait and speech (or a driving video) in, the video streamed while it generates,
        with progress, cancel and resume, and an Eval tab. Needs the ui extra: pip install "avatarcli[ui]"."""
        from avatarcli.ui import require_gradio

        if not 1 <= port <= 65535:
            raise AvatarError(f"--port must be between 1 and 65535, got {port}")
        if save_every < 0:
            raise AvatarError(f"--save-every must be at least 0, got {save_every}")
        if weights is not None:
            from avatarcli.hub import check_weights_dir

            check_weights_dir(weights)
        require_gradio()  # exit 3 naming the install, before Gradio's slow import
        from avatarcli.ui.app import serve
        from avatarcli.ui.studio import Studio

        studio, served = Studio(device=device, weights=weights, save_every=save_every), None
        try:
            served, url = _serve(serve, studio, host, port, share)
            typer.echo(f"avatarcli ui: {url} (Ctrl-C stops it)", err=True)
            _wait()
        finally:
            if served is not None:
                served.close()
            studio.close()


def _serve(serve, studio, host: str, port: int, share: bool):
    try:
        return serve(studio, host, port, share, quiet=True)
    except OSError as error:  # Gradio: the port is taken, or the address is not this machine's
        raise AvatarError(f"cannot serve on {host}:{port} ({' '.join(str(error).split())}); choose another "
                          "--port or --host") from None


def _wait() -> None:
    import time

    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the app stopped and its session folders were removed") from None
