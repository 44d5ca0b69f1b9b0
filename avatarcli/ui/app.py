"""The page of `avatarcli ui`, drawn with Gradio (the `ui` extra), and its server.

Every handler hands its work to studio.py; the handlers only turn the page's values into a form and the studio's
updates into the page. Generation and resume share one concurrency group of Gradio's queue with a limit of one, so one
job runs at a time and waiting requests see their position. Inputs arrive unprocessed (`preprocess=False`), so a bad
upload reaches the library's checks and its message is shown in the page, not a traceback.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from avatarcli.ui.studio import FORM_OPTIONS, Session, Studio, Update, failure

CSS = """
#status .avatarcli-status { font-family: monospace; }
#status progress { width: 100%; }
#status [data-state=error] { color: #b91c1c; }
"""


def file_path(payload: Any) -> str | None:
    """The server-side path of an unprocessed file value (a FileData, as a dict or an object)."""
    if payload is None or payload == "":
        return None
    if isinstance(payload, str):
        return payload
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None)


def status_html(text: str, fraction: float = 0.0, state: str = "running") -> str:
    """The status line: a progress bar and one line of text; `state` (running, done, cancelled, error) is an
    attribute the page's tests read."""
    bar = f'<progress value="{fraction:.3f}" max="1"></progress>' if state in ("running", "done") else ""
    return (f'<div class="avatarcli-status" data-state="{state}" data-fraction="{fraction:.3f}">{bar}'
            f"<div>{html.escape(text)}</div></div>")


def _state(update: Update) -> str:
    if update.error:
        return "error"
    if update.video is not None:
        return "done"
    return "cancelled" if update.cancelled else "running"


def _page_updates(session: Session, updates):
    """The studio's updates as the outputs (session, status, preview, video, summary, resume button)."""
    for update in updates:
        resumable = gr.update(interactive=session.paused is not None)
        yield (session, status_html(update.text, update.fraction, _state(update)),
               str(update.preview) if update.preview is not None else gr.skip(),
               str(update.video) if update.video is not None else gr.skip(),
               update.summary if update.summary is not None else gr.skip(), resumable)


def _refused(session: Session, error: Exception):
    yield (session, status_html(failure(session, error).text, state="error"), gr.skip(), gr.skip(), gr.skip(),
           gr.update(interactive=session.paused is not None))


def build_app(studio: Studio) -> gr.Blocks:
    from avatarcli.presets import list_presets

    presets = list_presets()
    with gr.Blocks(title="avatarcli", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        session = gr.State(None, delete_callback=lambda value: value.close() if value is not None else None)
        gr.Markdown("## avatarcli\nA portrait and speech (or a driving video) in, a talking video out, streamed "
                    "while it generates.")
        with gr.Tab("Animate"):
            with gr.Row():
                with gr.Column():
                    portrait = gr.Image(label="Portrait", sources=["upload", "webcam"], type="filepath",
                                        elem_id="portrait", height=260)
                    with gr.Tab("Speech"):
                        audio = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath",
                                         elem_id="audio")
                    with gr.Tab("Driving video"):
                        driving = gr.Video(label="Driving video (instead of speech)", sources=["upload"],
                                           elem_id="driving")
                    model = gr.Radio([("demo (built in, runs on a CPU)", "demo"),
                                      ("official weights", "stableavatar")], value="demo", label="Model",
                                     elem_id="model")
                    weights = gr.Textbox(label="Weights folder (official weights; empty: the Hugging Face cache, "
                                               "see avatarcli download)",
                                         value=str(studio.weights) if studio.weights else "", elem_id="weights")
                    preset = gr.Dropdown([(f"{p.name}: {p.description}", p.name) for p in presets],
                                         value="balanced", label="Preset", elem_id="preset")
                    with gr.Accordion("Advanced settings (empty: the preset's, or the model's own)", open=False):
                        with gr.Row():
                            steps = gr.Textbox(label="Steps", elem_id="steps")
                            seed = gr.Textbox(label="Seed", elem_id="seed")
                            size = gr.Textbox(label="Size WxH", elem_id="size")
                        with gr.Row():
                            text_scale = gr.Textbox(label="Text guidance scale", elem_id="text_scale")
                            audio_scale = gr.Textbox(label="Audio guidance scale", elem_id="audio_scale")
                            emo_scale = gr.Textbox(label="Expression scale (driving)", elem_id="emo_scale")
                        with gr.Row():
                            overlap = gr.Textbox(label="Overlap (latent frames)", elem_id="overlap")
                            precision = gr.Dropdown(["auto", "fp8"], value="auto", label="Precision",
                                                    elem_id="precision")
                            decoder = gr.Dropdown([("preset's", ""), ("full", "full"), ("tiny", "tiny")], value="",
                                                  label="Decoder (driving)", elem_id="decoder")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel = gr.Button("Cancel", elem_id="cancel")
                        resume = gr.Button("Resume", interactive=False, elem_id="resume")
                with gr.Column():
                    status = gr.HTML(status_html("ready", state="idle"), elem_id="status")
                    preview = gr.Video(label="As it is written (the finished segments)", interactive=False,
                                       autoplay=True, height=300, elem_id="preview")
                    video = gr.Video(label="Result", interactive=False, height=300, elem_id="result")
                    result_summary = gr.JSON(label="Run summary", elem_id="summary")
        with gr.Tab("Eval"):
            _eval_tab(studio, session, presets)
        form = [portrait, audio, driving, model, weights, preset, steps, seed, size, text_scale, audio_scale,
                emo_scale, overlap, precision, decoder]
        outputs = [session, status, preview, video, result_summary, resume]

        def on_generate(state, *values):
            current = state or studio.new_session()
            form_values = dict(zip(FORM_OPTIONS, values))
            for name in ("portrait", "audio", "driving"):
                form_values[name] = file_path(form_values[name])
            try:
                job = studio.job(current, form_values)
            except Exception as error:  # noqa: BLE001 - bad input (or worse) is a message in the page
                yield from _refused(current, error)
                return
            yield from _page_updates(current, studio.run(current, job))

        def on_resume(state):
            current = state or studio.new_session()
            try:
                job = studio.resume_job(current)
            except Exception as error:  # noqa: BLE001 - a message in the page
                yield from _refused(current, error)
                return
            yield from _page_updates(current, studio.run(current, job))

        def on_cancel(state):
            if state is not None and state.cancel():
                gr.Info("Cancelling after the current window-step; its state is kept for Resume.")

        generate.click(on_generate, [session, *form], outputs, api_name="generate", preprocess=False,
                       concurrency_id="animate", concurrency_limit=1)
        resume.click(on_resume, [session], outputs, api_name="resume", concurrency_id="animate",
                     concurrency_limit=1)
        cancel.click(on_cancel, [session], None, api_name="cancel", concurrency_limit=None)
    return app


def _eval_tab(studio: Studio, session, presets) -> None:
    gr.Markdown("Measure a video: lip sync, identity drift, window seams, flicker (as `avatarcli eval`).")
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Video", sources=["upload"], elem_id="eval_video")
            reference = gr.Image(label="Portrait it was made from", sources=["upload"], type="filepath",
                                 elem_id="eval_portrait", height=200)
            audio = gr.Audio(label="Speech (empty: the video's own track)", sources=["upload"], type="filepath",
                             elem_id="eval_audio")
            layout = gr.Radio(["auto", "demo", "detect"], value="auto", label="Face layout (auto: the demo world's "
                              "boxes on 128x128 videos, else the face detector)", elem_id="eval_layout")
            face_box = gr.Textbox(label="Face box x0,y0,x1,y1 as fractions (optional)", elem_id="eval_face_box")
            preset = gr.Dropdown([p.name for p in presets], value="balanced", label="Preset that placed the windows",
                                 elem_id="eval_preset")
            measure = gr.Button("Measure", variant="primary", elem_id="eval_measure")
        with gr.Column():
            status = gr.HTML(elem_id="eval_status")
            plot = gr.Image(label="Per-frame curves", type="filepath", interactive=False, elem_id="eval_plot")
            metrics = gr.JSON(label="Metrics (avatarcli eval --json)", elem_id="eval_metrics")

    def on_measure(state, video_value, reference_value, audio_value, layout_value, box, preset_value):
        current = state or studio.new_session()
        try:
            numbers, drawn = studio.evaluate(current, file_path(video_value), file_path(reference_value),
                                             file_path(audio_value), layout_value, box or None, preset_value)
        except Exception as error:  # noqa: BLE001 - every failure goes to the page
            return current, status_html(failure(current, error).text, state="error"), gr.skip(), gr.skip()
        return current, status_html(eval_line(numbers), 1.0, "done"), str(drawn), numbers

    measure.click(on_measure, [session, video, reference, audio, layout, face_box, preset],
                  [session, status, plot, metrics], api_name="evaluate", preprocess=False)


def eval_line(summary: dict) -> str:
    """The headline numbers of an eval summary."""
    def number(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lip = summary.get("lip_sync") or {}
    return (f"{summary['frames']} frames · lip sync r {number(lip.get('correlation'))} · drift "
            f"{number(summary['drift']['start'], '.2f')} -> {number(summary['drift']['end'], '.2f')} · seam score "
            f"{number(summary['seams']['score'], '.2f')} · flicker {number(summary['flicker'])}")


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, share: bool = False, quiet: bool = False):
    """Build the page and serve it without blocking; returns the app (`.close()` stops it) and its local URL."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    _, url, _ = app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                           allowed_paths=[str(studio.root)], quiet=quiet, css=CSS, footer_links=["api"])
    return app, url
