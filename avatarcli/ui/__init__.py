"""`avatarcli ui`: a local web app (Gradio) over the library, an optional front end beside the CLI.

studio.py is the engine and imports no Gradio: sessions with their own output folders, the models kept loaded
between requests, a run as a stream of page updates (progress, preview, result), cancel and resume. app.py draws
the page with Gradio (the `ui` extra) and serves it. Both go through the same job builder and `animate` as the CLI
and batch manifests.
"""

from __future__ import annotations

UI_INSTALL = 'pip install "avatarcli[ui]"'


def require_gradio() -> None:
    """EnvironmentProblem (exit 3) naming the install when the `ui` extra is missing; Gradio itself is not imported
    here (that takes seconds)."""
    from importlib.util import find_spec

    from avatarcli.errors import EnvironmentProblem

    try:
        found = find_spec("gradio") is not None
    except (ImportError, ValueError):  # a module entry set to None, or a broken install
        found = False
    if not found:
        raise EnvironmentProblem(f"avatarcli ui needs Gradio, which is not installed: {UI_INSTALL}")
