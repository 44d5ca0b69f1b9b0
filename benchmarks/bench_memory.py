"""`animate --audio` under GPU memory caps: does it run, how long does it take, how much does it hold, which modes.

Every case runs in its own process, which caps itself with `torch.cuda.set_per_process_memory_fraction` before
anything touches the GPU (emulating a smaller card: the cap covers torch's allocator, not the ~0.5 GiB of CUDA context
a real card also holds), builds every StableAvatar component at full size with random weights (benchmarks/common.py,
as bench_animate.py), the DiT and umT5 on the host and placed as the driver's load places them (`place_models`:
offload hooks, umT5 whole or offloaded by the memory left), and runs the library's `animate` on a synthetic speech
clip with a prompt no cache holds (umT5 runs). A case that runs out of memory says where, and the next case starts
afresh.

    python benchmarks/bench_memory.py                          # 8 GiB with --offload group, 12 GiB, uncapped
    python benchmarks/bench_memory.py --cases 8:group,8:model,10:none --seconds 4 --steps 6
    python benchmarks/bench_memory.py --tiny                   # CPU smoke test of the script (no caps)

Prints a markdown table last: per case the cap, offload, where umT5 ran, ok/OOM (and the stage), the wall time of
`animate` and its stage split, the peak GPU memory allocated and reserved, and the decode mode the run chose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
MARK = "BENCH_MEMORY_ROW "


def run_case(args, cap_gib: float, offload: str) -> dict:
    """One capped run in this process (the --case child); returns its row."""
    import torch

    device = torch.device("cpu" if args.tiny else "cuda:0")  # an index: the memory-fraction call needs one
    if device.type == "cuda" and cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(cap_gib * GIB / total, 1.0), device)
    row = dict(cap_gib=cap_gib, offload=offload, status="ok", stage="", umt5="", wall=0.0, features=0.0, dit=0.0,
               decode=0.0, peak_alloc_gib=0.0, peak_reserved_gib=0.0, decode_mode="", frames=0, build_s=0.0)
    stage = StagePeaks(device)
    try:
        components, row["build_s"] = build(args, device, offload)
        from avatarcli.loading.memory import has_offload_hooks

        row["umt5"] = "offloaded" if has_offload_hooks(components.text_encoder) else "whole"
        stage.watch(components)
        result = animate_case(args, components, offload, device, stage)
    except Exception as error:  # torch's OOM, the library's one-line error for it, or anything else: say which
        oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)
        row.update(status="OOM" if oom else "error", stage=stage.current, error=oom_line(error),
                   where=innermost(error))
    else:
        timings = result.timings
        row.update(wall=result.wall_seconds, features=timings.get("features", 0.0), dit=timings.get("dit", 0.0),
                   decode=timings.get("decode", 0.0) + result.background_timings.get("decode", 0.0),
                   decode_mode=result.decode_mode, encode_mode=result.encode_mode, frames=result.frames,
                   branch_batch=result.branch_batch)
    row["stage_peaks_gib"] = stage.finish()
    if device.type == "cuda":
        row.update(peak_alloc_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    return row


class StagePeaks:
    """The peak GPU memory allocated in each stage the run reports (`on_progress`) and in each encoder's forward."""

    def __init__(self, device) -> None:
        self.device, self.current, self.peaks = device, "build", {}

    def __call__(self, progress) -> None:
        if progress.stage != self.current:
            self.close(self.current)
            self.current = progress.stage

    def close(self, name: str) -> None:
        import torch

        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / GIB
            self.peaks[name] = round(max(self.peaks.get(name, 0.0), peak), 2)
            torch.cuda.reset_peak_memory_stats(self.device)

    def watch(self, components) -> None:
        """Hooks that close a stage of its own around umT5's, CLIP's and the VAE encoder's forwards."""
        for name in ("text_encoder", "image_encoder"):
            module = getattr(components, name, None)
            if module is not None:
                self.hook(module, name)
        self.hook(components.vae.encoder, "vae_encoder")

    def hook(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.close(self.current))
        module.register_forward_hook(lambda *_: self.close(name))

    def finish(self) -> dict:
        self.close(self.current)
        return self.peaks


def oom_line(error: Exception) -> str:
    """The error's type and first line (torch's names the allocation that failed)."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def innermost(error: Exception) -> str:
    """The innermost frames of the traceback (file:line function), where the allocation failed."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)[-4:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))


def build(args, device, offload: str):
    """The components as the audio driver's load leaves them: VAE, CLIP and wav2vec2 on the device, the DiT there
    too unless offloaded, umT5 placed by `place_models`."""
    import torch

    from avatarcli.drivers.stableavatar import place_models
    from avatarcli.testing.components import write_tiny_umt5_tokenizer
    from common import full_size_components

    tick = time.perf_counter()
    dtype = torch.float32 if args.tiny else torch.bfloat16
    tokenizer = write_tiny_umt5_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    components = full_size_components(device, dtype, tokenizer, args.tiny, on_host=("transformer", "text_encoder"))
    if offload == "none":
        components.transformer.to(device)
    place_models(components, offload, device, dtype)
    return components, time.perf_counter() - tick


def animate_case(args, components, offload: str, device, stage: list):
    from avatarcli.pipeline import AnimateJob, animate
    from avatarcli.presets import load_preset
    from common import EXAMPLES, synthetic_speech

    work = Path(tempfile.mkdtemp())
    preset = load_preset(args.preset).with_overrides(steps=args.steps, size=args.size)
    job = AnimateJob(portrait=EXAMPLES / "portrait.png", audio=synthetic_speech(work / "talk.wav", args.seconds),
                     output=work / "out.mp4", preset=preset, device=str(device), null_sink=True, offload=offload,
                     prompt=f"A person talks (bench_memory {time.time()})")  # no prompt cache holds it: umT5 runs
    return animate(job, models=components, on_progress=stage)


def run_child(args, case: str, timeout: float) -> dict:
    """Run one case in a fresh process; a crash or a timeout is a row too."""
    cap, offload = case.split(":")
    command = [sys.executable, __file__, "--case", case, "--seconds", str(args.seconds), "--steps", str(args.steps),
               "--size", args.size, "--preset", args.preset] + (["--tiny"] if args.tiny else [])
    tick = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(cap_gib=float(cap), offload=offload, status="timeout", stage=f"> {timeout:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return dict(cap_gib=float(cap), offload=offload, status=f"crash (exit {done.returncode})", stage=tail[:120],
                child_s=time.perf_counter() - tick)


def table(rows: list[dict], args) -> str:
    head = ("| cap GiB | offload | umT5 | status | wall s | features s | DiT s | decode s | peak alloc GiB | "
            "peak reserved GiB | reference encode | decode mode | branches per forward |")
    lines = [f"{args.size}, {args.seconds:g} s of speech, preset {args.preset}, {args.steps} steps", "", head,
             "|" + "---|" * 13]
    for r in rows:
        cap = f"{r['cap_gib']:g}" if r.get("cap_gib") else "none"
        status = r["status"] if r["status"] == "ok" else f"{r['status']} ({r.get('stage', '')})"
        lines.append(f"| {cap} | {r['offload']} | {r.get('umt5', '')} | {status} | {r.get('wall', 0):.1f} | "
                     f"{r.get('features', 0):.1f} | {r.get('dit', 0):.1f} | {r.get('decode', 0):.1f} | "
                     f"{r.get('peak_alloc_gib', 0):.2f} | {r.get('peak_reserved_gib', 0):.2f} | "
                     f"{r.get('encode_mode', '')} | {r.get('decode_mode', '')} | {r.get('branch_batch', '')} |")
    lines.append("")
    for r in rows:  # where the memory went, and where a run failed
        cap = f"{r['cap_gib']:g}" if r.get("cap_gib") else "none"
        peaks = ", ".join(f"{k} {v:.2f}" for k, v in r.get("stage_peaks_gib", {}).items())
        lines.append(f"- {cap}/{r['offload']}: peak GiB per stage: {peaks or '-'}")
        if r["status"] != "ok":
            lines.append(f"  {r.get('error', '')} at {r.get('where', '')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="8:group,12:none,0:none",
                        help="CAP_GIB:OFFLOAD, comma-separated (0: uncapped; offload none, model, group, sequential)")
    parser.add_argument("--seconds", type=float, default=2.0, help="speech length (default 2: one window)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default=None, help="WxH (default 480x832; --tiny: 64x64)")
    parser.add_argument("--preset", default="reference", help="every step runs all 3 guidance branches")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (no caps): a smoke test")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child's own case
    args = parser.parse_args()
    args.size = args.size or ("64x64" if args.tiny else "480x832")
    if args.case is not None:
        cap, offload = args.case.split(":")
        print(MARK + json.dumps(run_case(args, float(cap), offload)), flush=True)
        return
    rows = []
    for case in args.cases.split(","):
        rows.append(run_child(args, case, args.timeout))
        print(f"  {case}: {rows[-1]['status']} {rows[-1].get('stage', '')} {rows[-1].get('error', '')}",
              file=sys.stderr, flush=True)
    print("\n" + table(rows, args))


if __name__ == "__main__":
    main()
