"""`eval --plot`: the per-frame curves as one PNG, drawn with Pillow (no plotting library needed).

Panels, all over time in seconds: mouth openness against the audio loudness envelope; the face's distance from the
reference with per-window means; frame-to-frame difference with the window overlaps shaded and the window edges
marked; with a second video, PSNR and SSIM per frame; PSNR to the portrait per frame for each measured region
(whole frame, face box and, on demo-world videos, hair, skin, shirt and background), their DeltaE76 first -> last in
the title.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from avatarcli.errors import AvatarError

WIDTH = 1400
PANEL_HEIGHT = 250
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 44, 42
BLUE, ORANGE, GREEN, RED, GREY, PURPLE = (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), \
    (150, 150, 150), (148, 103, 189)
SHADE = (255, 228, 228)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(span: float, count: int = 6) -> float:
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    return next(f * power for f in (1, 2, 2.5, 5, 10) if f * power >= raw)


class _Panel:
    def __init__(self, image, top: int, x_max: float, y_min: float, y_max: float, title: str, y_label: str) -> None:
        from PIL import ImageDraw

        self.draw = draw = ImageDraw.Draw(image)
        self.image, self.top = image, top
        self.x0, self.x1 = LEFT, WIDTH - RIGHT
        self.y0, self.y1 = top + TOP, top + PANEL_HEIGHT - BOTTOM
        self.x_max = max(x_max, 1e-9)
        if not (math.isfinite(y_min) and math.isfinite(y_max)):
            y_min, y_max = 0.0, 1.0
        if y_max - y_min < 1e-9:
            y_min, y_max = y_min - 0.5, y_max + 0.5
        pad = 0.05 * (y_max - y_min)
        self.y_min, self.y_max = y_min - pad, y_max + pad
        font, small = _font(16), _font(13)
        draw.text((self.x0, top + 10), title, fill=(0, 0, 0), font=font)
        draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline=(0, 0, 0), fill=(255, 255, 255))
        step = _nice_step(self.y_max - self.y_min, 4)
        value = math.ceil(self.y_min / step) * step
        while value <= self.y_max:
            y = self.py(value)
            draw.line([self.x0, y, self.x1, y], fill=(232, 232, 232))
            draw.line([self.x0 - 5, y, self.x0, y], fill=(0, 0, 0))
            label = f"{value:g}" if abs(value) >= 1e-9 else "0"
            draw.text((self.x0 - 8, y), label, fill=(0, 0, 0), font=small, anchor="rm")
            value += step
        step = _nice_step(self.x_max, 10)
        value = 0.0
        while value <= self.x_max + 1e-9:
            x = self.px(value)
            draw.line([x, self.y1, x, self.y1 + 5], fill=(0, 0, 0))
            draw.text((x, self.y1 + 8), f"{value:g}", fill=(0, 0, 0), font=small, anchor="mt")
            value += step
        draw.text((self.x1, self.y1 + 24), "time (s)", fill=(0, 0, 0), font=small, anchor="rt")
        _vertical_text(image, (16, (self.y0 + self.y1) // 2), y_label, small)
        self.legend_x = self.x1 - 10

    def px(self, x: float) -> float:
        return self.x0 + (self.x1 - self.x0) * x / self.x_max

    def py(self, y: float) -> float:
        y = min(max(y, self.y_min), self.y_max)
        return self.y1 - (self.y1 - self.y0) * (y - self.y_min) / (self.y_max - self.y_min)

    def line(self, xs: np.ndarray, ys: np.ndarray, colour, width: int = 2) -> None:
        points = [(self.px(x), self.py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(points) == 1:
            points.append(points[0])
        if points:
            self.draw.line(points, fill=colour, width=width, joint="curve")

    def vline(self, x: float, colour, width: int = 1) -> None:
        self.draw.line([self.px(x), self.y0 + 1, self.px(x), self.y1 - 1], fill=colour, width=width)

    def shade(self, x_a: float, x_b: float, colour=SHADE) -> None:
        self.draw.rectangle([self.px(x_a), self.y0 + 1, max(self.px(x_b), self.px(x_a) + 1), self.y1 - 1],
                            fill=colour)

    def legend(self, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
        font = _font(13)
        y = self.top + 14
        for text, colour in reversed(entries):
            right = self.legend_x
            self.draw.text((right, y), text, fill=(0, 0, 0), font=font, anchor="rm")
            width = self.draw.textlength(text, font=font)
            if colour == SHADE:
                self.draw.rectangle([right - width - 34, y - 6, right - width - 8, y + 6], fill=colour,
                                    outline=(200, 150, 150))
            else:
                self.draw.line([right - width - 34, y, right - width - 8, y], fill=colour, width=3)
            self.legend_x = right - width - 50


def _vertical_text(image, centre: tuple[int, int], text: str, font) -> None:
    """Text rotated a quarter turn anticlockwise, centred on `centre` (Pillow draws only horizontal text)."""
    from PIL import Image, ImageDraw

    width = int(ImageDraw.Draw(image).textlength(text, font=font)) + 4
    label = Image.new("L", (width, 18), 0)
    ImageDraw.Draw(label).text((2, 9), text, fill=255, font=font, anchor="lm")
    label = label.rotate(90, expand=True)
    x, y = centre[0] - label.width // 2, centre[1] - label.height // 2
    image.paste((0, 0, 0), (x, y, x + label.width, y + label.height), label)


def _scaled(values: np.ndarray) -> np.ndarray:
    top = float(np.max(values)) if values.size else 0.0
    return values / top if top > 0 else values


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def draw_report(report, path: str | Path) -> Path:
    """Write the report's curves to `path` (PNG, written to a temporary name and renamed): lip sync, identity drift,
    identity against the portrait by region, seams and flicker, and (with a comparison video) PSNR, one panel each."""
    from PIL import Image

    path = Path(path)
    if not path.parent.is_dir():
        raise AvatarError(f"plot folder {path.parent} does not exist; create it first")
    panels = [_lip_sync_panel, _drift_panel] + ([_regions_panel] if _measured_regions(report) else []) + \
        [_seams_panel] + ([_psnr_panel] if report.psnr is not None else [])
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(panels) + 10), (250, 250, 250))
    x_max = max(report.frames - 1, 1) / report.fps
    for row, draw in enumerate(panels):
        draw(image, row * PANEL_HEIGHT, x_max, report)
    temporary = path.with_name(f".{path.name}.partial.png")
    try:
        image.save(temporary, format="PNG")
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise AvatarError(f"cannot write plot {path}: {error.strerror or error}") from error
    return path


def _lip_sync_panel(image, top_y: int, x_max: float, report) -> None:
    fps, ls, name = report.fps, report.lip_sync, Path(report.video).name
    if ls is None:
        title = f"{name}: mouth openness (no audio given, lip sync not measured)"
    else:
        title = (f"{name}: lip sync  r = {_fmt(ls.correlation)} at lag 0,  best r = {_fmt(ls.best_correlation)} "
                 f"at lag {ls.best_lag} frames (+ = mouth after sound)")
    panel = _Panel(image, top_y, x_max, 0.0, 1.0, title, "scaled")
    for b in report.boundaries:
        panel.vline(b.start_frame / fps, GREY)
    t = np.arange(report.frames) / fps
    entries = [("mouth openness / max", BLUE)]
    if report.envelope is not None:
        panel.line(t, _scaled(report.envelope), ORANGE)
        entries.append(("audio RMS / max", ORANGE))
    compare = report.compare_mouth
    top = max(float(report.mouth.max()), float(compare.max()) if compare is not None and compare.size else 0.0)
    top = top if top > 0 else 1.0
    if compare is not None:  # both mouths on one scale, so a weaker articulation shows
        panel.line(np.arange(compare.size) / fps, compare / top, GREY)
        entries.append(("comparison's mouth", GREY))
    panel.line(t, report.mouth / top, BLUE)
    panel.legend(entries)


def _drift_panel(image, top_y: int, x_max: float, report) -> None:
    fps, drift = report.fps, report.drift
    title = (f"identity drift: face colour distance from the reference (DeltaE76, mouth excluded)  "
             f"first {_fmt(report.drift_start, '.2f')}  last {_fmt(report.drift_end, '.2f')}")
    panel = _Panel(image, top_y, x_max, 0.0, float(drift.max()), title, "DeltaE")
    for b in report.boundaries:
        panel.vline(b.start_frame / fps, GREY)
    panel.line(np.arange(report.frames) / fps, drift, PURPLE, 1)
    for (a, b), value in zip(report.windows, report.drift_per_window):
        panel.line(np.array([a / fps, (b - 1) / fps]), np.array([value, value]), (0, 0, 0), 3)
    panel.legend([("per frame", PURPLE), ("window mean", (0, 0, 0))])


REGION_COLOURS = {"frame": GREY, "face": PURPLE, "hair": ORANGE, "skin": RED, "shirt": GREEN, "background": BLUE}


def _measured_regions(report) -> list:
    return [(name, curve) for name, curve in getattr(report, "regions", {}).items() if curve is not None]


def _regions_panel(image, top_y: int, x_max: float, report) -> None:
    regions, span = _measured_regions(report), report.region_span
    low = min(float(curve.psnr.min()) for _, curve in regions)
    high = max(float(curve.psnr.max()) for _, curve in regions)
    changes = "    ".join(f"{name} {_fmt(float(curve.delta_e[:span].mean()), '.2f')} -> "
                          f"{_fmt(float(curve.delta_e[-span:].mean()), '.2f')}" for name, curve in regions)
    title = "identity against the portrait by region: PSNR per frame"
    panel = _Panel(image, top_y, x_max, low, high, title, "PSNR dB")
    panel.draw.text((panel.x0, top_y + 29), f"DeltaE76, first -> last {span} frames:    {changes}", fill=(0, 0, 0),
                    font=_font(13))
    for name, curve in regions:
        panel.line(np.arange(curve.psnr.size) / report.fps, curve.psnr, REGION_COLOURS.get(name, (0, 0, 0)),
                   2 if name != "frame" else 1)
    panel.legend([(name, REGION_COLOURS.get(name, (0, 0, 0))) for name, _ in regions])


def _seams_panel(image, top_y: int, x_max: float, report) -> None:
    fps, d, s = report.fps, report.differences, report.seams
    title = (f"frame-to-frame difference  seam score {_fmt(s.score, '.2f')} (edges), {_fmt(s.overlap_score, '.2f')} "
             f"(overlaps)  flicker {_fmt(report.flicker, '.3f')}")
    panel = _Panel(image, top_y, x_max, 0.0, float(d.max()) if d.size else 1.0, title, "mean |diff|")
    for b in report.boundaries:
        panel.shade((b.span[0] + 0.5) / fps, (b.span[1] + 0.5) / fps)
    for b in report.boundaries:
        for edge in b.edges:
            panel.vline((edge + 0.5) / fps, RED, 2)
    panel.line((np.arange(d.size) + 0.5) / fps, d, GREEN)
    panel.legend([("|frame[t+1] - frame[t]|", GREEN), ("window edge", RED), ("overlap (shaded)", SHADE)])


def _psnr_panel(image, top_y: int, x_max: float, report) -> None:
    p = report.psnr
    title = (f"against the comparison video: PSNR mean {_fmt(float(p.mean()), '.2f')} / min "
             f"{_fmt(float(p.min()), '.2f')} dB,  SSIM mean {_fmt(float(report.ssim.mean()), '.4f')} / min "
             f"{_fmt(float(report.ssim.min()), '.4f')}")
    panel = _Panel(image, top_y, x_max, float(p.min()), float(p.max()), title, "PSNR dB")
    panel.line(np.arange(p.size) / report.fps, p, RED)
    panel.legend([("PSNR per frame", RED)])
