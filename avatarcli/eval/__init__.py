"""Offline quality measurements of generated talking videos (`avatarcli eval`); numpy, Pillow and ffmpeg only.

Lip sync, identity drift (also by region against the portrait: whole frame, face box, and on demo-world videos hair,
skin, shirt and background), window seams, flicker and, against a second video, PSNR/SSIM. No model weights are
needed: see metrics.py for what each number is made of and layout.py for how the face, the mouth and the demo world's
parts are found.
"""

from avatarcli.eval.report import EvalJob, EvalReport, evaluate, evaluate_frames, window_boundaries

__all__ = ["EvalJob", "EvalReport", "evaluate", "evaluate_frames", "window_boundaries"]
