"""What keeps a training run's output folder whole: one writer at a time (a lock file), a fresh run never mixing with
another run's checkpoints, a resume that cannot silently change what the checkpoint was trained with, and signals that
stop the run at a step boundary with a checkpoint instead of losing the work since the last one."""

import ctypes
import dataclasses
import logging
import os
import shutil
import signal
import socket
from typing import Any

import yaml

from .checkpoints import checkpoints_dir, complete_checkpoints
from .config import TrainingConfig

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "training_config.yaml"
# Options a resumed run may change (logged); every other option must equal the first run's.
MUTABLE_ON_RESUME = frozenset({
    "output_dir", "resume_from_checkpoint", "learning_rate", "max_train_steps", "num_epochs", "max_grad_norm",
    "mixed_precision", "dataloader_num_workers", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
    "validation_images", "validation_corruptions", "validation_severities", "num_grid_images", "num_inference_steps",
    "quality_samples", "report", "report_images", "report_samples", "logger", "push_to_hub", "hub_model_id",
    "hub_private_repo", "license", "overwrite_output_dir", "epsilon_scale_base", "epsilon_scale_slope", "num_threads",
})


class OutputDirLock:
    """`output_dir/.lock` holding `host:pid` of the run writing there. A lock whose process is gone (same host) is
    stale and replaced with a warning; a live one stops the second run with an error naming it."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.held = False

    def acquire(self) -> "OutputDirLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise RuntimeError(f"another run (process {holder}) is writing to {os.path.dirname(self.path)}; "
                                       f"wait for it, stop it, or use another output_dir") from None
                logger.warning("removing the stale lock %s (its process is gone)", self.path)
                os.remove(self.path)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(self.owner)
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def _holder(self) -> str | None:
        """The live `host:pid` holding the lock, or None if the lock is stale (or unreadable and empty)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                owner = handle.read().strip()
            host, pid = owner.rsplit(":", 1)
            pid = int(pid)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return owner  # another machine's process cannot be checked: assume it is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return owner

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False


def prepare_fresh_output_dir(output_dir: str, overwrite: bool) -> None:
    """A fresh run (no `resume_from_checkpoint`) must not write beside another run's checkpoints: their rotation and
    `latest` would mix the two runs. `ValueError` naming them, unless `overwrite` (then they are deleted first)."""
    found = complete_checkpoints(output_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(os.path.basename(path) for path in found)
        raise ValueError(f"{output_dir} holds another run's checkpoints ({names}): resume it with --resume_from_checkpoint "
                         "latest, pick another output_dir, or pass --overwrite_output_dir to delete them")
    logger.warning("overwrite_output_dir: deleting %d checkpoint(s) of the previous run in %s", len(found), output_dir)
    shutil.rmtree(checkpoints_dir(output_dir))


def check_resume_config(output_dir: str, config: TrainingConfig) -> dict[str, tuple[Any, Any]]:
    """
    Compare a resumed run's options with the first run's (`output_dir/training_config.yaml`).

    Returns the changed options that may change (`{name: (first, now)}`, for the log); raises `ValueError` naming
    any other changed option, since the checkpoint's weights, optimizer, data order or noise depend on it.
    """
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: cannot check that the resumed run matches the first one")
    with open(path, encoding="utf-8") as handle:
        first = yaml.safe_load(handle) or {}
    current = dataclasses.asdict(config)
    changed = {name: (first.get(name), value) for name, value in current.items() if name in first and first[name] != value}
    refused = sorted(name for name in changed if name not in MUTABLE_ON_RESUME)
    if refused:
        details = "; ".join(f"{name}: {changed[name][0]!r} -> {changed[name][1]!r}" for name in refused)
        raise ValueError(f"cannot resume {output_dir} with changed option(s) the checkpoint depends on ({details}); "
                         "start a new run in another output_dir instead")
    return {name: values for name, values in changed.items() if name in MUTABLE_ON_RESUME}


class StopSignals:
    """
    SIGTERM and SIGINT ask the run to stop at the next step boundary (`requested` names the signal); a second one
    exits at once. The process also asks the kernel for SIGTERM when its parent dies (Linux), so a trainer whose
    `accelerate launch` was killed stops cleanly instead of training on as an orphan.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        for number in (signal.SIGTERM, signal.SIGINT):
            self._previous[number] = signal.signal(number, self._handle)
        try:  # PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
        except (AttributeError, OSError):
            pass
        return self

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.requested is not None:
            logger.error("second %s: exiting now, without a checkpoint", name)
            os._exit(128 + number)
        self.requested = name
        logger.warning("%s received: finishing this step, saving a checkpoint, then stopping (send it again to exit now)",
                       name)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.requested]) if self.requested else 0
