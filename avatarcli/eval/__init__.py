"""Offline quality measurements of generated talking videos (`avatarcli eval`); numpy, Pillow and ffmpeg only.

Lip sync, identity drift, window seams, flicker and, against a second video, PSNR/SSIM. No model weights are needed:
see metrics.py for what each number is made of and layout.py for how the face and the mouth are found.
"""

from avatarcli.eval.report import EvalJob, EvalReport, evaluate, evaluate_frames, window_boundaries

__all__ = ["EvalJob", "EvalReport", "evaluate", "evaluate_frames", "window_boundaries"]
