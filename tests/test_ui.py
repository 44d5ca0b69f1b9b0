"""`avatarcli ui` end to end: one app server for the module, driven by headless Chromium through Playwright (Debian's
`chromium`, installed by .ci/run) and by gradio_client, on the demo model at 64x64, 8 steps, 2 s of speech.

The first generation, in the browser, is the reference: cancel-then-resume and the API's generation must give its
frames exactly. AVATARCLI_UI_SCREENSHOT=FILE keeps the browser's screenshot (examples/ui.png is one)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avatarcli.cli import main
from avatarcli.media.video import iter_video_frames

SECONDS, FPS = 2, 25
SETTINGS = {"steps": "8", "size": "64x64"}  # the smallest size; the demo model's own seed and scales


def chromium_executable() -> str:
    """Debian's Chromium binary (its /usr/bin/chromium is a shell wrapper), or AVATARCLI_CHROMIUM."""
    for candidate in (os.environ.get("AVATARCLI_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("no Chromium: apt-get install chromium (.ci/run does), or set AVATARCLI_CHROMIUM")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A demo-world face and 2 s of its speech, made by `avatarcli demo-face` as the README does."""
    folder = tmp_path_factory.mktemp("ui-inputs")
    face, talk = folder / "face.png", folder / "talk.wav"
    truth = folder / "truth.mp4"  # the world's own video of that speech, for the Eval tab
    assert main(["demo-face", "--seed", "3", "-o", str(face), "--speech", str(talk), "--seconds", str(SECONDS),
                 "--video", str(truth)]) == 0
    face4, talk4 = folder / "face4.png", folder / "talk4.wav"  # two windows: the first is previewed
    assert main(["demo-face", "--seed", "3", "-o", str(face4), "--speech", str(talk4), "--seconds", "4"]) == 0
    notes = folder / "notes.txt"
    notes.write_text("not an image\n" * 20)
    fake = folder / "fake.png"  # a text file under an image's name: past the page's file-type filter
    fake.write_text("not an image\n" * 20)
    return SimpleNamespace(face=face, talk=talk, truth=truth, talk4=talk4, notes=notes, fake=fake)


@pytest.fixture(scope="module")
def app():
    from avatarcli.ui.app import serve
    from avatarcli.ui.studio import Studio

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and leaves a core to the browser
    studio = Studio(device="cpu", save_every=0)
    served, url = serve(studio, port=free_port(), quiet=True)
    yield SimpleNamespace(url=url, studio=studio, served=served)
    served.close()
    studio.close()
    torch.set_num_threads(threads)
    assert not studio.root.exists()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
        yield chromium
        chromium.close()


def open_page(browser, app):
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(app.url)
    page.wait_for_selector("#generate")
    return page


def fill_form(page, portrait: Path, speech: Path, settings: dict[str, str]) -> None:
    page.locator("#portrait input[type=file]").set_input_files(str(portrait))
    page.locator("#audio input[type=file]").set_input_files(str(speech))
    page.get_by_text("Advanced settings").click()
    for name, value in settings.items():
        page.locator(f"#{name} textarea").fill(value)
    page.locator("#audio audio").first.wait_for(state="attached")  # uploaded
    if portrait.suffix == ".png":
        page.locator('#portrait img[src*="gradio_api/file="]').wait_for(state="attached")


def status(page) -> tuple[str, str]:
    """(state, text) of the status line: idle, running, done, cancelled or error."""
    return page.evaluate("""() => {
        const el = document.querySelector('#status .avatarcli-status');
        return el ? [el.dataset.state, el.innerText.trim()] : ['', ''];
    }""")


# Every status line the page renders, logged in the page by a MutationObserver: a line shown for less than one poll
# (the last window-step just before "done", on a busy machine) is not missed. Each call starts a new log.
RECORD_STATUS = """() => {
    window.__statusLog = [];
    const record = () => {
        const el = document.querySelector('#status .avatarcli-status');
        const entry = el ? [el.dataset.state, el.innerText.trim()] : ['', ''];
        const last = window.__statusLog[window.__statusLog.length - 1];
        if (!last || last[0] !== entry[0] || last[1] !== entry[1]) window.__statusLog.push(entry);
    };
    record();
    if (!window.__statusObserver) {
        window.__statusObserver = new MutationObserver(() => window.__statusRecord());
        window.__statusObserver.observe(document.body,
                                        {subtree: true, childList: true, characterData: true, attributes: true});
    }
    window.__statusRecord = record;
}"""


def watch(page, until: tuple[str, ...], timeout: float = 120, on_text=None) -> list[tuple[float, str, str]]:
    """The status lines shown (seconds since the call when read, state, text), until the state is one of `until`."""
    started, seen, read = time.perf_counter(), [], 0
    page.evaluate(RECORD_STATUS)
    while time.perf_counter() - started < timeout:
        entries = page.evaluate(f"() => window.__statusLog.slice({read})")
        read += len(entries)
        for state, text in entries:
            if not seen or seen[-1][1:] != (state, text):
                seen.append((time.perf_counter() - started, state, text))
                if on_text is not None:
                    on_text(text)
            if state in until:
                return seen
        time.sleep(0.05)
    pytest.fail(f"the page did not reach {until} in {timeout} s; it showed {seen[-3:]}")


def video_src(page, elem_id: str) -> str | None:
    return page.evaluate(f"() => document.querySelector('#{elem_id} video')?.getAttribute('src') || null")


def fetch_video(page, src: str, path: Path) -> list[np.ndarray]:
    response = page.request.get(src)
    assert response.ok
    path.write_bytes(response.body())
    return list(iter_video_frames(path))


def window_steps(text: str) -> int | None:
    match = re.search(r"window-step (\d+)/", text)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def first_generation(app, browser, inputs, tmp_path_factory):
    """The browser's generation: what the page showed, when, and the video it served."""
    page = open_page(browser, app)
    fill_form(page, inputs.face, inputs.talk, SETTINGS)
    clicked = time.perf_counter()
    page.locator("#generate").click()
    first_frames = {}

    def note_frames(_text):
        for elem_id in ("preview", "result"):
            if elem_id not in first_frames and video_src(page, elem_id):
                first_frames[elem_id] = time.perf_counter() - clicked

    seen = watch(page, ("done", "error", "cancelled"), on_text=note_frames)
    page.wait_for_function("() => document.querySelector('#result video')?.readyState >= 1")
    finished = time.perf_counter() - clicked
    duration = page.evaluate("() => document.querySelector('#result video').duration")
    shot = Path(os.environ.get("AVATARCLI_UI_SCREENSHOT") or tmp_path_factory.mktemp("ui-shot") / "ui.png")
    page.screenshot(path=str(shot), full_page=True)
    frames = fetch_video(page, video_src(page, "result"), tmp_path_factory.mktemp("ui-video") / "first.mp4")
    first = min(first_frames.values(), default=finished)
    print(f"\nbrowser, demo model {SETTINGS['size']}, {SETTINGS['steps']} steps, {SECONDS} s of speech: click -> first "
          f"frames {first:.1f} s ({'preview' if 'preview' in first_frames else 'the finished video'}), click -> "
          f"finished video {finished:.1f} s (with the first load of the models; the page: {seen[-1][2]}); screenshot "
          f"{shot}")
    page.close()
    return SimpleNamespace(seen=seen, frames=frames, duration=duration, shot=shot)


def test_browser_generates_a_playable_video_and_shows_progress(first_generation):
    states = [state for _, state, _ in first_generation.seen]
    assert states[-1] == "done", first_generation.seen[-1]
    steps = {window_steps(text) for _, _, text in first_generation.seen} - {None}
    assert len(steps) >= 3 and max(steps) == int(SETTINGS["steps"]), first_generation.seen  # the progress moved
    assert any("about" in text and "s left" in text for _, _, text in first_generation.seen)  # an ETA
    assert f"{SECONDS * FPS} frames" in first_generation.seen[-1][2]
    assert abs(first_generation.duration - SECONDS) < 0.1  # the browser loaded it: a playable mp4
    assert len(first_generation.frames) == SECONDS * FPS
    assert first_generation.frames[0].shape == (64, 64, 3)
    assert first_generation.shot.stat().st_size > 10_000


def test_a_bad_upload_shows_a_message_in_the_page(app, browser, inputs):
    page = open_page(browser, app)
    fill_form(page, inputs.notes, inputs.talk, {})  # the page itself refuses a .txt as an image
    page.locator("#generate").click()
    seen = watch(page, ("error", "done"), timeout=20)
    assert seen[-1][1] == "error" and "upload a portrait" in seen[-1][2]
    page.locator("#portrait input[type=file]").set_input_files(str(inputs.fake))
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('fake.png')", timeout=20_000)
    state, text = status(page)
    assert state == "error" and text.startswith("cannot read portrait image fake.png"), text  # the CLI's check
    assert "Traceback" not in page.content()
    page.close()


def test_cancel_then_resume_gives_the_frames_of_an_uninterrupted_run(app, browser, inputs, first_generation,
                                                                     tmp_path):
    page = open_page(browser, app)
    fill_form(page, inputs.face, inputs.talk, SETTINGS)
    page.locator("#generate").click()
    # Cancel once the job is past the model cache (features, or early sampling): it stops after a window-step, with
    # its state saved.
    clicks = []

    def cancel_once(text):
        early = text.startswith("extracting") or (window_steps(text) or 99) < int(SETTINGS["steps"]) - 2
        if early and not clicks:
            page.locator("#cancel").click()
            clicks.append(text)

    watch(page, ("done", "error", "cancelled"), timeout=60, on_text=cancel_once)
    state, text = status(page)
    assert state == "cancelled" and "state is kept" in text, text
    assert page.locator("#resume").is_enabled()
    page.locator("#resume").click()
    seen = watch(page, ("done", "error"), timeout=120)
    assert seen[-1][1] == "done", seen[-1]
    resumed = fetch_video(page, video_src(page, "result"), tmp_path / "resumed.mp4")
    assert len(resumed) == len(first_generation.frames)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, first_generation.frames))
    page.close()


def api_form(portrait: Path, speech: Path) -> dict:
    from gradio_client import handle_file

    return dict(portrait=handle_file(str(portrait)), audio=handle_file(str(speech)), driving=None, model="demo",
                weights="", preset="balanced", steps=SETTINGS["steps"], seed="", size=SETTINGS["size"],
                text_scale="", audio_scale="", emo_scale="", overlap="", precision="auto", decoder="")


def test_gradio_client_runs_the_same_generation(app, inputs, first_generation):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    status_html, _preview, video, summary = client.predict(*api_form(inputs.face, inputs.talk).values(),
                                                           api_name="/generate")
    assert 'data-state="done"' in status_html
    path = video["video"] if isinstance(video, dict) else video
    frames = list(iter_video_frames(path))
    assert summary["frames"] == len(frames) == SECONDS * FPS and summary["nfe"] > 0
    assert all(np.array_equal(a, b) for a, b in zip(frames, first_generation.frames))
    assert app.studio.models.loads == 1  # loaded by the first generation, kept since


def test_the_preview_shows_the_finished_frames_while_the_rest_generates(app, inputs):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    started, previews, final = time.perf_counter(), [], None
    for status_html, preview, video, _summary in client.submit(*api_form(inputs.face, inputs.talk4).values(),
                                                               api_name="/generate"):
        if isinstance(preview, str) and final is None:
            previews.append((time.perf_counter() - started, preview))
        if isinstance(video, str):
            final = (time.perf_counter() - started, video)
    assert previews and final, status_html
    shown = list(iter_video_frames(previews[0][1]))
    frames = list(iter_video_frames(final[1]))
    assert 0 < len(shown) < len(frames) == 4 * FPS
    assert all(np.array_equal(a, b) for a, b in zip(shown, frames))  # the finished segment, as in the video
    print(f"\nAPI, 4 s of speech (2 windows): first frames {previews[0][0]:.1f} s ({len(shown)} frames), finished "
          f"video {final[0]:.1f} s")


def test_the_eval_tab_measures_a_video_as_avatarcli_eval_does(app, inputs):
    from gradio_client import Client, handle_file

    from avatarcli.eval import EvalJob, evaluate

    client = Client(app.url, verbose=False)
    status_html, plot, metrics = client.predict(handle_file(str(inputs.truth)),
                                                handle_file(str(inputs.face)), None, "demo", "", "balanced",
                                                api_name="/evaluate")
    assert 'data-state="done"' in status_html and "lip sync r" in status_html
    expected = evaluate(EvalJob(video=inputs.truth, reference=inputs.face, layout="demo", overlap=8)).summary()
    assert metrics["lip_sync"] == expected["lip_sync"] and metrics["frames"] == SECONDS * FPS
    assert Path(plot).stat().st_size > 1000


def test_a_sessions_folder_is_removed_with_its_state(app):
    from gradio_client import Client

    client = Client(app.url, verbose=False)
    before = set(app.studio.root.iterdir())
    status_html, *_ = client.predict(api_name="/resume")  # a session with nothing to resume: a message
    assert "nothing to resume" in status_html
    (folder,) = set(app.studio.root.iterdir()) - before
    app.served.state_holder.delete_state(client.session_hash)  # what Gradio does an hour after a tab closed
    assert not folder.exists()


def test_ui_without_gradio_exits_3_naming_the_install_and_help_does_not_import_it():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "from avatarcli.cli import main\n"
            "assert main(['--help']) == 0 and main(['ui', '--help']) == 0\n"
            "print('gradio imported' if sys.modules.get('gradio') else 'gradio not imported')\n"
            "sys.exit(main(['ui', '--port', '0']) * 10 + main(['ui']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 * 10 + 3, result.stderr
    assert "gradio not imported" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == 'error: avatarcli ui needs Gradio, which is not installed: pip install "avatarcli[ui]"'
    assert "--port must be between 1 and 65535" in lines[-2]
