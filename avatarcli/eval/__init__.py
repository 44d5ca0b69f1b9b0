"""Offline quality measurements of generated talking videos (`avatarcli eval`); numpy, Pillow and ffmpeg, and on
real (non-demo) videos a small face detector (faces.py) whose weights come with a dependency.

Lip sync, identity drift (also by region against the portrait: whole frame, face box, and on demo-world videos hair,
skin, shirt and background), window seams, flicker and, against a second video, PSNR/SSIM. Nothing is downloaded:
see metrics.py for what each number is made of and layout.py for how the face, the mouth and the demo world's parts
are found.
"""

from avatarcli.eval.report import EvalJob, EvalReport, evaluate, evaluate_frames, window_boundaries

__all__ = ["EvalJob", "EvalReport", "evaluate", "evaluate_frames", "window_boundaries"]
