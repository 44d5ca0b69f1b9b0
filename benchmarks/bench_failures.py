"""Failures as a user meets them: the console script run on bad or unusual inputs and stopped at each stage, as a
shell would run it. Per case: the exit code, the seconds to exit (from the signal, or from the start where nothing is
sent), and the lines on stderr (the status line and the progress bar, which redraw themselves, not counted).

    python benchmarks/bench_failures.py              # tiny random weights, 64x64, CPU; about 90 s
    python benchmarks/bench_failures.py --only inputs,second   # some groups only

The disk-full case writes into a 64 KiB tmpfs and needs root (mount); elsewhere it is left out. Prints a table last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from avatarcli.testing import make_tiny_weights
from avatarcli.testing.console import CLI, ConsoleRun, tone

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Run(ConsoleRun):
    """A console run that ends in a table row."""

    def send(self, *names: str) -> None:
        for name in names:
            if self.process.poll() is None:
                super().send(getattr(signal, name))
                time.sleep(0.1)

    def result(self, case: str) -> dict:
        code, seconds = self.finish(300)
        lines = self.message_lines()
        return {"case": case, "code": code, "seconds": seconds, "lines": len(lines), "first": lines[0] if lines else ""}


def signal_cases(work: Path, animate) -> list[dict]:
    """A stop at each stage of a run (the one after the last window-step is in tests/test_failure_paths.py)."""
    rows = []
    for stage, wait, names in (("torch import", "loading torch", ["SIGINT", "SIGINT"]),
                               ("load", "loading torch", ["SIGTERM"]), ("features", "extracting features", ["SIGINT"]),
                               ("sample", "window-steps 2/", ["SIGINT"]),
                               ("sample", "window-steps 2/", ["SIGTERM", "SIGINT"])):
        output = work / f"stop-{stage}-{len(names)}.mp4"
        run = Run(animate(output), cwd=work)
        run.wait_for(wait)
        if stage == "load":
            time.sleep(2.0)
        run.send(*names)
        rows.append(run.result(f"{' then '.join(names)} during {stage}"))
    return rows


def input_cases(work: Path, animate) -> list[dict]:
    done = work / "done.mp4"
    subprocess.run([*CLI, *map(str, animate(done, "--quiet"))], check=True, cwd=work)
    manifest = work / "typo.yaml"
    manifest.write_text(f"jobs:\n  - portrait: {EXAMPLES / 'portrait.png'}\n    audio: {work / 'speech.wav'}\n"
                        f"    output: {work / 'typo.mp4'}\n    seeed: 3\n", encoding="utf-8")
    cases = {
        "--size 100000x100000": animate(work / "huge.mp4", "--size", "100000x100000"),
        "an existing output without --overwrite": animate(done),
        "an output name without .mp4": animate(work / "noext"),
        "--weights naming a file": [*animate(work / "w.mp4")[:-2], "--weights", EXAMPLES / "portrait.png"],
        "a manifest key with a typo (seeed)": ["batch", manifest],
        "presets fast --yaml": ["presets", "fast", "--yaml"],
        "--crf 0": animate(work / "crf0.mp4", "--crf", "0"),
        "--resume with nothing saved": animate(work / "fresh.mp4", "--resume"),
    }
    rows = []
    for case, args in cases.items():
        run = Run(args, cwd=work)
        rows.append(run.result(case))
    return rows


def second_run_case(work: Path, animate) -> list[dict]:
    output = work / "shared.mp4"
    first = Run(animate(output), cwd=work)
    first.wait_for("window-steps 1/")
    second = Run(animate(output), cwd=work)
    row = second.result("a second run on the same output")
    first.send("SIGKILL")
    first.result("")
    return [row]


def disk_full_case(work: Path, animate) -> list[dict]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return []
    folder = work / "full"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)]).returncode != 0:
        return []
    try:
        return [Run(animate(folder / "talk.mp4"), cwd=work).result("a full disk (64 KiB tmpfs)")]
    finally:
        subprocess.run(["umount", str(folder)])


def table(rows: list[dict]) -> str:
    lines = ["| input | exit code | seconds to exit | stderr lines | first line |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        first = r["first"].replace("|", "/")
        lines.append(f"| {r['case']} | {r['code']} | {r['seconds']:.2f} | {r['lines']} | "
                     f"{first[:110] + ('...' if len(first) > 110 else '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="signals,inputs,second,disk", help="which groups, comma-separated")
    args = parser.parse_args()
    groups = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = make_tiny_weights(work / "weights", model="stableavatar")
        speech = tone(work / "speech.wav", 10.0)

        def animate(output: Path, *extra) -> list:
            return ["animate", EXAMPLES / "portrait.png", "--audio", speech, "-o", output, "--size", "64x64",
                    "--steps", "2", "--weights", weights, *extra]

        rows = []
        for name, group in (("signals", signal_cases), ("inputs", input_cases), ("second", second_run_case),
                            ("disk", disk_full_case)):
            if name in groups:
                rows += group(work, animate)
                print(table(rows[-1:]).splitlines()[-1] if rows else "", file=sys.stderr, flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
