"""The driving-video front end: milliseconds per frame for each stage and frames per second end to end.

The FanEncoder is built at its published size (random weights, published key names, saved and read back through
the strict weights-only loader); the two face ONNX networks are the tiny stand-ins of avatarcli.testing (the
published ones are small networks too, but their cost is not measured here — pass --face-dir to time real files).

    python benchmarks/bench_expression.py --frames 100 --device cuda
    python benchmarks/bench_expression.py --frames 8 --device cpu          # smoke test
    python benchmarks/bench_expression.py --face-dir weights/FlashPortrait  # the published files

Prints a table last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from avatarcli.features.expression import ExpressionExtractor
from avatarcli.features.face.geometry import pdfgc_input, pdfgc_warp
from avatarcli.features.face.tracker import TwoPassTracker
from avatarcli.models.pdfgc import FanEncoder
from avatarcli.testing.flashportrait_face import synthetic_driving_frames, write_tiny_face_files

from common import synchronize


def full_size_pd_fpg(path: Path) -> Path:
    torch.manual_seed(0)
    model = FanEncoder()
    state = {k: (v + 0.1 * torch.randn_like(v)) if k.endswith("running_mean") else v
             for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", default="512x512", help="driving frame WxH")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--face-dir", type=Path, help="folder with the published face files (default: tiny ones)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    frames = synthetic_driving_frames(args.frames, height, width)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.face_dir
        if folder is None:
            folder = write_tiny_face_files(Path(tmp) / "FlashPortrait")
            full_size_pd_fpg(folder / "pd_fpg.pth")
        extractor = ExpressionExtractor.from_folder(folder, device=args.device)

        tracker = TwoPassTracker(extractor.detector, extractor.landmarks)
        start = time.perf_counter()
        tracked = [tracker(np.ascontiguousarray(f[:, :, ::-1])) for f in frames]
        track_s = time.perf_counter() - start
        found = [(f, t.points) for f, t in zip(frames, tracked) if t.points is not None]

        start = time.perf_counter()
        crops = [pdfgc_warp(f, points) for f, points in found]
        warp_s = time.perf_counter() - start

        batch = torch.from_numpy(np.stack([pdfgc_input(c) for c in crops])).to(args.device)
        with torch.no_grad():
            extractor.encoder.features(batch[:2])  # warm-up
            synchronize(args.device)
            start = time.perf_counter()
            for i in range(0, len(batch), 16):
                extractor.encoder.features(batch[i:i + 16])
            synchronize(args.device)
        encode_s = time.perf_counter() - start

        start = time.perf_counter()
        features = extractor.extract(frames)
        synchronize(args.device)
        total_s = time.perf_counter() - start

    n = len(frames)
    rows = [("detect + landmarks, both passes", track_s), ("PD-FGC warp", warp_s), ("FanEncoder (batch 16)", encode_s),
            ("extract() end to end", total_s)]
    print(f"\n{n} frames {width}x{height}, device {args.device}, faces found in {len(found)}, "
          f"features {tuple(features.shape)}, onnx files: {'published' if args.face_dir else 'tiny stand-ins'}")
    print(f"| {'stage':<34} | {'ms/frame':>9} |")
    print(f"|{'-' * 36}|{'-' * 11}|")
    for name, seconds in rows:
        print(f"| {name:<34} | {1000 * seconds / n:9.2f} |")
    print(f"| {'frames per second (end to end)':<34} | {n / total_s:9.1f} |")


if __name__ == "__main__":
    main()
