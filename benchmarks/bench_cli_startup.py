"""How fast the CLI answers `--help`, `--version` and rejected input (target: under 0.5 s each).

Runs the installed console script in a subprocess, 5 times per case (more with --runs), and prints per case the
median and fastest wall time, the median CPU time (user + system of the child: close to the wall time on an idle
machine, and much less sensitive to other load than the wall time), and whether torch was imported on the way (it
must not be for any of these).

    python benchmarks/bench_cli_startup.py [--runs 5]

Cases: --help, animate --help, --version, and animate with a missing portrait, unreadable audio, an unknown flag and
a --weights folder that does not exist.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

TARGET_SECONDS = 0.5
PROBE = ("import runpy, sys, atexit\n"
         "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else '', file=sys.stderr))\n"
         "sys.argv = ['avatarcli', *sys.argv[1:]]\n"
         "runpy.run_module('avatarcli', run_name='__main__')\n")


def cases(folder: Path) -> dict[str, list[str]]:
    portrait, speech = ROOT / "examples" / "portrait.png", ROOT / "examples" / "speech.wav"
    unreadable = folder / "notes.wav"
    unreadable.write_text("not audio\n" * 100)
    out = folder / "out.mp4"
    return {
        "--help": ["--help"],
        "animate --help": ["animate", "--help"],
        "--version": ["--version"],
        "missing portrait": ["animate", str(folder / "nope.png"), "--audio", str(speech), "-o", str(out)],
        "unreadable audio": ["animate", str(portrait), "--audio", str(unreadable), "-o", str(out)],
        "bad flag": ["animate", str(portrait), "--audio", str(speech), "--no-such-flag"],
        "no --weights folder": ["animate", str(portrait), "--audio", str(speech), "-o", str(out), "--weights",
                                str(folder / "nowhere")],
    }


def time_once(command: list[str]) -> tuple[float, float, int, bool]:
    """(wall seconds, CPU seconds, exit code, torch imported?) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.returncode, "torch imported" in result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    script = Path(sys.executable).parent / "avatarcli"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "avatarcli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in cases(Path(tmp)).items():
            times, cpu_times, codes = [], [], set()
            for _ in range(args.runs):
                seconds, cpu, code, _ = time_once([*launcher, *argv])
                times.append(seconds)
                cpu_times.append(cpu)
                codes.add(code)
            # One more run through a probe that reports whether torch got imported (not timed).
            torch_seen = time_once([sys.executable, "-c", PROBE, *argv])[3]
            median = statistics.median(times)
            rows.append((name, median, min(times), statistics.median(cpu_times), ",".join(map(str, sorted(codes))),
                         torch_seen, "yes" if median < TARGET_SECONDS else "NO"))
    print(f"avatarcli start-up, median of {args.runs} runs ({' '.join(launcher)}), python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print()
    print(f"| case | median wall s | min wall s | median CPU s | exit code | torch imported | wall < {TARGET_SECONDS} s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, median, fastest, cpu, codes, torch_seen, ok in rows:
        print(f"| {name} | {median:.3f} | {fastest:.3f} | {cpu:.3f} | {codes} | {'yes' if torch_seen else 'no'} | {ok} |")


if __name__ == "__main__":
    main()
