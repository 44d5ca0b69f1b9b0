"""Presets and their variants on the demo model: decoded-frame PSNR against the `reference` preset, transformer
forwards (NFE) and branch forwards per window, over demo faces x speech clips; guidance reuse with and without.

    nice python benchmarks/bench_guidance_reuse.py                        # 3 faces x 2 clips of 4 s, CPU
    python benchmarks/bench_guidance_reuse.py --faces 3 --clips 101 --seconds 4 --reuse "3:1:1:0.05;2:2:0:1000"
    nice python benchmarks/bench_guidance_reuse.py --whole --presets all --seconds 8 --cache refs   # the preset table
    nice python benchmarks/bench_guidance_reuse.py --whole --presets fast --seconds 8 --cache refs \
        --candidates "fast:steps=30;fast:steps=20,prediction.max_predicted=10"                      # a preset sweep

For each face (a demo-world identity seed, as `avatarcli demo-face --seed N`) and speech clip (the world's synthetic
speech of that seed) the job is built as the CLI builds `animate face.png --audio talk.wav --model demo --preset
reference` (the model's own size and audio scale) and run through the library's `animate`, frames kept in memory,
models loaded once. The methods are scored against that run. By default every method keeps the reference's windows,
blend, guidance and seed and takes a preset's steps and step prediction (as bench_predict_sweep.py scores presets),
so what differs from the reference is the sampling alone:
  PRESET                    its steps and `prediction`, guidance reuse off
  PRESET+reuse              the same with the preset's own `guidance_reuse` section (skipped if it has none)
  PRESET+W:M:O:T            the same with guidance reuse warmup W, max_reused M, order O, tolerance T (`--reuse`)
  BASE:KEY=VALUE,...        a variant of preset BASE (`--candidates`, ';'-separated): KEY a preset field, or
                            prediction.KNOB / guidance_reuse.KNOB for one setting of that section (VALUE null: the
                            section off); the variant is written as a preset file and loaded through the preset schema;
                            KEY dtype sets the job's --dtype instead (a method whose dtype or numerics differs from
                            the reference's loads its own models)
`--whole` runs each method's preset entire instead, as `animate ... --model demo --preset PRESET --seed 42` does (its
own overlap, blend, guidance, step prediction and guidance reuse, under the model's own defaults, with the
reference's seed): what a user of the preset gets. `--presets all` is every shipped preset for --audio but
`reference`. NFE and branch forwards come from the run's AnimateResult (`nfe`, `branch_forwards`, as `--json`
reports them). `--cache DIR` keeps the reference's frames per face and clip, so a later sweep reuses them.
Prints rows as they finish, the table last: per method the mean over the runs and the worst run's PSNR, and the
cheapest method (branch forwards per video second) whose worst run reaches `--goal` dB.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from avatarcli.demo import world
from avatarcli.eval.metrics import psnr
from avatarcli.media.audio import write_wav
from avatarcli.options import build_job
from avatarcli.pipeline import animate, prepare
from avatarcli.presets import list_presets, load_preset, preset_yaml
from avatarcli.runtime import resolve_device, resolve_dtype
from avatarcli.sampling.guidance_reuse import GuidanceReuse
from avatarcli.sink.memory import MemorySink

OWN = "own"  # a method's guidance reuse is its preset's own section
SECTIONS = ("prediction", "guidance_reuse")
JOB_KEYS = ("dtype",)  # keys of a candidate that set the job (as the CLI's flag of that name), not the preset


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    preset: str | Path  # a preset name or a preset file
    reuse: GuidanceReuse | None | str  # None: off; OWN: the preset's own section
    job_values: tuple = ()  # (key, value) pairs of JOB_KEYS the method's job takes


def preset_names(presets: str) -> list[str]:
    if presets.strip() == "all":
        return [p.name for p in list_presets() if "audio" in p.drivers and p.name != "reference"]
    return [p.strip() for p in presets.split(",") if p.strip()]


def variant_file(spec: str, folder: Path, index: int) -> tuple[Path, tuple]:
    """Preset BASE with KEY=VALUE changes (module notes) as a preset file in `folder`, and the job's changes."""
    base, _, changes = spec.partition(":")
    values = yaml.safe_load(preset_yaml(load_preset(base.strip())))
    job_values = []
    for change in [c.strip() for c in changes.split(",") if c.strip()]:
        key, _, text = change.partition("=")
        value = yaml.safe_load(text)
        section, _, knob = key.strip().partition(".")
        if key.strip() in JOB_KEYS:
            job_values.append((key.strip(), value))
        elif knob and section in SECTIONS and value is not None:
            values[section] = {**(values.get(section) or {}), knob: value}
        else:
            values[key.strip()] = value
    path = folder / f"variant{index}.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    load_preset(path)  # checked by the preset schema now, not after the reference runs
    return path, tuple(job_values)


def methods(presets: str, reuse: str, candidates: str, whole: bool, folder: Path) -> list[Method]:
    out = []
    for name in preset_names(presets):
        out.append(Method(name, name, OWN if whole else None))
        if not whole and load_preset(name).guidance_reuse is not None:
            out.append(Method(f"{name}+reuse", name, OWN))
        for spec in [s.strip() for s in reuse.split(";") if s.strip()]:
            w, m, o, t = spec.split(":")
            out.append(Method(f"{name}+{spec}", name, GuidanceReuse(warmup=int(w), max_reused=int(m), order=int(o),
                                                                    tolerance=float(t))))
    for index, spec in enumerate([s.strip() for s in candidates.split(";") if s.strip()]):
        path, job_values = variant_file(spec, folder, index)
        out.append(Method(spec, path, OWN, job_values))
    return out


def method_job(method: Method, reference_job, job_values: dict, whole: bool):
    """The job of `method` on the face and clip of `reference_job` (module notes: sampling alone, or `--whole`)."""
    if whole:
        job = dataclasses.replace(build_job({**job_values, **dict(method.job_values), "preset": method.preset,
                                             "seed": reference_job.seed}), null_sink=True)
        preset = job.preset
    else:
        job, own = dataclasses.replace(reference_job, **dict(method.job_values)), load_preset(method.preset)
        preset = dataclasses.replace(job.preset, steps=own.steps, prediction=own.prediction,
                                     guidance_reuse=own.guidance_reuse)
    if method.reuse != OWN:
        preset = dataclasses.replace(preset, guidance_reuse=method.reuse)
    return dataclasses.replace(job, preset=preset)


def run(job, models) -> tuple[np.ndarray, object, float]:
    sink = MemorySink()
    tick = time.perf_counter()
    result = animate(job, models=models, sink=sink)
    return sink.frames(), result, time.perf_counter() - tick


def reference_run(job, models, cache: Path | None, key: str) -> tuple[np.ndarray, int, int, int, float]:
    """(frames, nfe, branch forwards, windows, wall s) of the reference, from `cache` when it holds them."""
    path = cache / f"{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        kept = np.load(path)
        return kept["frames"], *(int(kept[k]) for k in ("nfe", "branch_forwards", "windows")), float(kept["wall"])
    frames, result, wall = run(job, models)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, frames=frames, nfe=result.nfe, branch_forwards=result.branch_forwards,
                 windows=result.windows, wall=wall)
    return frames, result.nfe, result.branch_forwards, result.windows, wall


def models_for(loaded: dict, job, driver, inputs):
    """The models `job` runs on, loaded once per driver.models_key into `loaded` and kept (batch's ModelSets holds one
    set at a time; the methods here alternate between sets face after face)."""
    key = driver.models_key(job, inputs)
    if key not in loaded:
        device = resolve_device(job.device)
        loaded[key] = driver.load(job, inputs, device, resolve_dtype(job.dtype, device))
    return loaded[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", default="3,11,23", help="demo-world identity seeds")
    parser.add_argument("--clips", default="101,202", help="speech seeds")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--presets", default="fast,balanced", help="comma-separated, or 'all'")
    parser.add_argument("--reuse", default="", help="extra guidance-reuse settings W:M:O:T, ';'-separated")
    parser.add_argument("--candidates", default="", help="preset variants BASE:KEY=VALUE,..., ';'-separated")
    parser.add_argument("--whole", action="store_true", help="run each method's preset entire (module notes)")
    parser.add_argument("--goal", type=float, default=27.0, help="worst-run PSNR (dB) the cheapest pick must reach")
    parser.add_argument("--cache", type=Path, help="a folder for the reference's frames, reused by later runs")
    parser.add_argument("--size", help="WxH (default: the demo model's own, 128x128); 64x64 is 4x cheaper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp())
    table = methods(args.presets, args.reuse, args.candidates, args.whole, work)
    # per method and run: PSNR, NFE / window, branch forwards / window, branch forwards / video s, wall s
    scores: dict[str, list[tuple[float, ...]]] = {method.name: [] for method in table}
    references: list[tuple[float, ...]] = []
    loaded: dict[tuple, object] = {}  # models per driver.models_key: a method's dtype or numerics loads its own
    for face in [int(x) for x in args.faces.split(",")]:
        for clip in [int(x) for x in args.clips.split(",")]:
            portrait, talk = work / f"face{face}.png", work / f"talk{clip}.wav"
            world.portrait(face).save(portrait)
            write_wav(talk, world.speech(clip, args.seconds))
            values = dict(portrait=portrait, audio=talk, output=work / "unused.mp4", model="demo", device=args.device,
                          size=args.size)
            job = dataclasses.replace(build_job({**values, "preset": "reference"}), null_sink=True)
            driver, inputs = prepare(job)
            key = f"reference-face{face}-clip{clip}-{args.seconds:g}s-{job.preset.size}-{args.device}"
            models = models_for(loaded, job, driver, inputs)
            reference, nfe, branches, windows, wall = reference_run(job, models, args.cache, key)
            references.append((nfe / windows, branches / windows, branches / args.seconds, wall))
            print(f"face {face} clip {clip}: reference {wall:.0f} s, NFE {nfe}, branches {branches}, {windows} "
                  "windows", file=sys.stderr, flush=True)
            for method in table:
                method_run = method_job(method, job, values, args.whole)
                frames, result, wall = run(method_run, models_for(loaded, method_run, driver, inputs))
                windows = result.windows
                scores[method.name].append((psnr(frames, reference), result.nfe / windows,
                                            result.branch_forwards / windows,
                                            result.branch_forwards / result.video_seconds, wall))
                print(f"  {method.name}: {wall:.0f} s, {scores[method.name][-1][0]:.2f} dB, NFE/window "
                      f"{result.nfe / windows:.2f}, branches/window {result.branch_forwards / windows:.2f}, "
                      f"{windows} windows", file=sys.stderr, flush=True)
    runs = len(references)
    sampling = ("each preset entire, the reference's seed" if args.whole
                else "the reference's windows, blend, guidance and seed with each method's steps and prediction")
    print(f"\ndemo model (embedded), {job.preset.size}, {args.seconds:g} s clips, faces {args.faces} x clips "
          f"{args.clips} ({runs} runs), {args.device}, {args.threads} threads; {sampling}; decoded PSNR against "
          "`reference` (50 Euler steps, all branches)")
    rows = {name: np.array(values) for name, values in scores.items()}
    passing = [name for name, r in rows.items() if r[:, 0].min() >= args.goal]
    if passing:
        best = min(passing, key=lambda name: rows[name][:, 3].mean())
        print(f"cheapest with every run >= {args.goal:g} dB: {best} ({rows[best][:, 3].mean():.1f} branch forwards "
              f"per video s, worst {rows[best][:, 0].min():.2f} dB)")
    else:
        print(f"no method holds {args.goal:g} dB on every run")
    print("| method | NFE / window | branch forwards / window | branch forwards / video s | decoded PSNR mean (dB) "
          "| worst run (dB) | wall s per run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    ref = np.array(references)
    print(f"| reference | {ref[:, 0].mean():.2f} | {ref[:, 1].mean():.2f} | {ref[:, 2].mean():.1f} | - | - | "
          f"{ref[:, 3].mean():.0f} |")
    for name, r in rows.items():
        print(f"| {name} | {r[:, 1].mean():.2f} | {r[:, 2].mean():.2f} | {r[:, 3].mean():.1f} | "
              f"{r[:, 0].mean():.2f} | {r[:, 0].min():.2f} | {r[:, 4].mean():.0f} |")


if __name__ == "__main__":
    main()
