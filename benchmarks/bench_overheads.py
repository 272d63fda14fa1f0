"""Whole-process cost of a training run, ours against the peer: peak memory, time per step, and the fixed cost (start-up
to the first step plus the end of the run), on the same preset, data, batch and thread count.

Usage: python benchmarks/bench_overheads.py [--preset pipelines/ddpm-digits] [--steps 40 120] [--repeats 2]

The peer is `benchmarks/peer_train_unconditional.py` (the Diffusers example's loop). Ours is
`training/train_robust_ddpm.py` with the same batch (16), learning rate and warm-up, the digits converted to the
preset's channels and size as the peer converts them, no validation split, no report and no logger; it still ends with
what every run of ours does: a final checkpoint, a validation grid (here one image of one DDIM step, since the peer's
loop as written here generates none: the example's own end-of-training grid is 16 images of 1000 DDPM steps), the
pipeline and the model card. Each configuration runs as its own process with one thread
(`OMP_NUM_THREADS=1`), alternating peer and ours. Peak memory is the process's maximum resident set size (`wait4`).
With two step counts per program, time per step is the slope and the fixed cost the intercept of wall time over steps;
start-up is the time from launch to the end of the first step (each program records it: ours in `metrics.json`,
`seconds_to_first_step`) less one step, and the end is the rest of the fixed cost.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def preset_shape(preset: str) -> tuple[int, int]:
    """`(channels, side)` of a preset folder's UNet: the peer converts the digits to them, so ours is told to as well."""
    with open(os.path.join(ROOT, preset, "unet", "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    side = config["sample_size"]
    return config["in_channels"], side if isinstance(side, int) else side[0]


def command(program: str, preset: str, steps: int, output_dir: str) -> list[str]:
    if program == "peer":
        return [sys.executable, os.path.join(ROOT, "benchmarks", "peer_train_unconditional.py"), "--preset", preset,
                "--output_dir", output_dir, "--max_train_steps", str(steps)]
    return [sys.executable, os.path.join(ROOT, "training", "train_robust_ddpm.py"), "--pipeline", preset,
            "--output_dir", output_dir, "--max_train_steps", str(steps), "--train_batch_size", "16",
            "--learning_rate", "1e-4", "--lr_warmup_steps", "500", "--validation_split", "null", "--report", "false",
            "--logger", "none", "--checkpointing_steps", "1000000", "--validation_steps", "1000000", "--num_threads", "1",
            "--num_grid_images", "1", "--num_inference_steps", "1",
            *("--channels", str(preset_shape(preset)[0]), "--resolution", str(preset_shape(preset)[1]))]


def run(program: str, preset: str, steps: int) -> tuple[float, float, float]:
    """`(wall seconds, peak RSS MiB, seconds from launch to the end of the first step)` of one whole process."""
    scratch = tempfile.mkdtemp(prefix=f"bench-{program}-")
    output_dir = os.path.join(scratch, "run")  # a new folder: ours refuses a folder holding files it did not write
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = os.path.join(scratch, "stderr.txt")  # a file, not a pipe: a full pipe would stall the process
    launched, started = time.time(), time.perf_counter()
    with open(log, "wb") as handle:
        process = subprocess.Popen(command(program, preset, steps, output_dir), env=env, stdout=subprocess.DEVNULL,
                                   stderr=handle, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    with open(log, encoding="utf-8", errors="replace") as handle:
        stderr = handle.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{program} failed:\n{stderr[-3000:]}")
    if program == "peer":
        with open(os.path.join(output_dir, "timing.json")) as handle:
            first_step = json.load(handle)["first_step_at"] - launched
    else:
        with open(os.path.join(output_dir, "metrics.json")) as handle:
            first_step = json.load(handle)["seconds_to_first_step"]
    shutil.rmtree(scratch, ignore_errors=True)
    return wall, usage.ru_maxrss / 1024, first_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pipelines/ddpm-digits")
    parser.add_argument("--steps", type=int, nargs=2, default=[40, 120], help="two step counts (slope and intercept)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    walls: dict[tuple[str, int], list[float]] = {}
    peaks: dict[str, list[float]] = {"peer": [], "ours": []}
    first_steps: dict[str, list[float]] = {"peer": [], "ours": []}
    for _ in range(args.repeats):
        for steps in args.steps:
            for program in ("peer", "ours"):
                wall, peak, first_step = run(program, args.preset, steps)
                walls.setdefault((program, steps), []).append(wall)
                peaks[program].append(peak)
                first_steps[program].append(first_step)
                print(f"{program} {steps} steps: {wall:.2f} s, first step done at {first_step:.2f} s, peak {peak:.0f} MiB",
                      flush=True)
    low, high = args.steps
    figures = {}
    for program in ("peer", "ours"):
        short, long = statistics.median(walls[(program, low)]), statistics.median(walls[(program, high)])
        per_step = (long - short) / (high - low)
        fixed, start_up = short - low * per_step, statistics.median(first_steps[program]) - per_step
        figures[program] = {"per_step": per_step, "fixed": fixed, "start_up": start_up, "end": fixed - start_up,
                            "peak": max(peaks[program])}
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, one thread; preset {args.preset}, batch 16, "
          f"steps {low} and {high}, {args.repeats} repeats (medians)")
    print("| | seconds per step | start-up seconds | end seconds | peak RSS MiB |\n|---|---|---|---|---|")
    for program, values in figures.items():
        print(f"| {program} | {values['per_step']:.4f} | {values['start_up']:.2f} | {values['end']:.2f} | "
              f"{values['peak']:.0f} |")
    ours, peer = figures["ours"], figures["peer"]
    print(f"| ours / peer | {ours['per_step'] / peer['per_step']:.3f} | {ours['start_up'] / peer['start_up']:.2f} | "
          f"{ours['end'] / peer['end']:.2f} | {ours['peak'] / peer['peak']:.3f} |")


if __name__ == "__main__":
    main()
