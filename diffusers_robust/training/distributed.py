"""What several processes need to agree on: per-micro-batch seeds, a weights checksum, and a clean shutdown."""

import gc
import logging
import os
import warnings

import numpy as np
import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """A seed for one micro-batch, from the run seed, the rank and the micro-batch counter.

    Drawing every random number of a step from a fresh generator seeded this way makes a resumed run
    draw exactly what the uninterrupted run drew, with no generator state to save."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


def parameter_checksum(model: torch.nn.Module) -> float:
    """A position-weighted sum of all parameters: equal on two ranks only if their weights are equal. One parameter at
    a time, so it needs memory for the largest parameter in float64, not a float64 copy of the whole model."""
    count = sum(p.numel() for p in model.parameters())
    total, offset = 0.0, 0
    for parameter in model.parameters():
        flat = parameter.detach().flatten().double().cpu()
        weights = 1.0 + torch.arange(offset, offset + flat.numel(), dtype=torch.float64) / max(count - 1, 1)
        total += float((flat * weights).sum())
        offset += flat.numel()
    return total


def shutdown_distributed(accelerator: Accelerator) -> int:
    """End training (trackers, process group) so that the gloo group's destructor never runs with the GIL held.

    DDP's Reducer and c10d's native registry drop their reference to the process group with the GIL held. If theirs
    is the last one while a gloo worker thread is still freeing a finished collective whose tensors need the GIL, the
    group's destructor waits for that thread forever: a rare hang at the exit of multi-process CPU runs (seen in CI,
    stack `~Reducer -> ~ProcessGroupGloo -> thread::join`). So the prepared objects are released first and the last
    reference is a Python one, whose release drops the GIL before the join.

    Call it after dropping your own references to the prepared model. Returns how many `DistributedDataParallel`
    wrappers were still alive (0 unless a reference was kept somewhere; a warning is logged then).
    """
    accelerator.free_memory()  # forgets the prepared model, optimizer and dataloaders; runs gc
    if not torch.distributed.is_initialized():  # one process: no group to hang on, no scan of every object
        accelerator.end_training()
        return 0
    ddp = torch.nn.parallel.DistributedDataParallel
    survivors = sum(issubclass(type(obj), ddp) for obj in gc.get_objects())  # type(): no __class__ lookups
    if survivors:
        warnings.warn(f"{survivors} DistributedDataParallel model(s) still referenced at shutdown; the process "
                      "group is released with them, which can hang at exit", RuntimeWarning, stacklevel=2)
    group = torch.distributed.group.WORLD
    accelerator.end_training()  # destroys the process group; `group` keeps it alive until the line below
    del group
    return survivors


def set_thread_count(num_threads: int | None, processes: int) -> int:
    """Set PyTorch's intra-op threads for this process and return the count.

    `num_threads` when given; else `OMP_NUM_THREADS` when set (as `accelerate launch --num_cpu_threads_per_process`
    does); else the usable cores divided among the `processes` training on this machine, at least 1. Two threads per
    process on cores that another process keeps busy make a step many times slower (`benchmarks/RESULTS.md`, "Figures
    behind the code"), so the default never oversubscribes, and a warning is logged when the machine's load says other
    work already holds those cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    if num_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        num_threads = int(os.environ["OMP_NUM_THREADS"])
    if num_threads is None:
        num_threads = max(1, cores // max(1, processes))
    torch.set_num_threads(num_threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load + num_threads * processes > cores + 0.5:
        logger.warning(
            f"{processes} process(es) x {num_threads} thread(s) on {cores} core(s) with a load average of {load:.1f}: "
            "the cores are oversubscribed, which can make each step many times slower; set num_threads (or "
            "OMP_NUM_THREADS) lower or wait for the other work to finish")
    return num_threads


def requested_processes(launcher_argv: list[str]) -> int | None:
    """The `--num_processes` / `--num-processes` value of an `accelerate launch` command line; None when absent."""
    for index, word in enumerate(launcher_argv):
        for flag in ("--num_processes", "--num-processes"):
            if word == flag and index + 1 < len(launcher_argv) and launcher_argv[index + 1].isdigit():
                return int(launcher_argv[index + 1])
            if word.startswith(flag + "=") and word.split("=", 1)[1].isdigit():
                return int(word.split("=", 1)[1])
    return None


def warn_if_launcher_dropped_processes(num_processes: int, device_type: str) -> str | None:
    """On CPU, `accelerate launch --num_processes N` without `--multi_gpu` starts one process that trains alone. Read the
    launcher's command line (Linux `/proc`), and when it asked for more processes than run, log a warning with the
    command that runs them; returns the warning (None when nothing was dropped or the launcher cannot be read)."""
    if device_type != "cpu" or num_processes > 1 or "ACCELERATE_USE_CPU" not in os.environ:
        return None  # only accelerate's single-process launcher sets ACCELERATE_USE_CPU without a process group
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            launcher = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return None
    wanted = requested_processes(launcher)
    if wanted is None or wanted <= num_processes:
        return None
    script = next((i for i, word in enumerate(launcher) if word.endswith(".py") and "accelerate" not in word), None)
    rest = " ".join(launcher[script:]) if script is not None else "training/train_robust_ddpm.py ..."
    message = (f"accelerate launch asked for {wanted} processes but runs 1 on this CPU machine (it needs --multi_gpu to "
               f"start several, even on CPU); to train with {wanted}: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
               f"--num_processes {wanted} --num_machines 1 --mixed_precision no --dynamo_backend no {rest}")
    logger.warning(message)
    return message
