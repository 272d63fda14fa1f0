"""Crash-safe checkpoint folders: written under a temporary name, renamed when complete, rotated.

Layout: `<output_dir>/checkpoints/checkpoint-<step>/` holding Accelerate's `save_state` files plus
`checkpoint.json` (`{"step": int, "epoch": int, ...}`). A save in progress lives in
`checkpoint-<step>.tmp`; a kill during the save leaves that folder behind, which is never picked up and
is removed by the next save, so the previous complete checkpoint stays usable.
"""

import contextlib
import errno
import json
import os
import re
import shutil
from typing import Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
METADATA_FILE = "checkpoint.json"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders, oldest first (by step)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(root, name, METADATA_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str) -> str:
    """`latest` -> the newest complete checkpoint; a path -> that folder, checked to be complete."""
    if resume_from_checkpoint == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint=latest but {checkpoints_dir(output_dir)} has no complete checkpoint")
        return found[-1]
    if not os.path.isfile(os.path.join(resume_from_checkpoint, METADATA_FILE)):
        raise FileNotFoundError(f"{resume_from_checkpoint} is not a complete checkpoint (no {METADATA_FILE})")
    return resume_from_checkpoint


def temporary_checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f"checkpoint-{step}.tmp")


def begin_checkpoint(output_dir: str, step: int, total_limit: int | None = None) -> str:
    """Main process: clear leftovers of interrupted saves, make room (with `total_limit`, drop the oldest checkpoints so
    that `total_limit - 1` remain, never the last one: a full disk then still takes the new save), and return the
    temporary folder to save into."""
    root = checkpoints_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if total_limit is not None:
        for old in complete_checkpoints(output_dir)[: -max(total_limit - 1, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    path = temporary_checkpoint_path(output_dir, step)
    os.makedirs(path)
    return path


def finish_checkpoint(output_dir: str, step: int, metadata: dict[str, Any], total_limit: int | None) -> str:
    """Main process, after every rank saved: write metadata, rename into place, drop the oldest beyond `total_limit`."""
    temporary = temporary_checkpoint_path(output_dir, step)
    with open(os.path.join(temporary, METADATA_FILE), "w", encoding="utf-8") as handle:
        json.dump({"step": step, **metadata}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    apply_umask(temporary)
    final = os.path.join(checkpoints_dir(output_dir), f"checkpoint-{step}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(temporary, final)
    if total_limit is not None:
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_metadata(path: str) -> dict[str, Any]:
    with open(os.path.join(path, METADATA_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def apply_umask(folder: str) -> None:
    """Give every file under `folder` the mode the umask allows (`0o666 & ~umask`), as `open()` would: safetensors writes
    its files through a private temporary file (mode 0600), which would make exported weights unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


@contextlib.contextmanager
def explain_full_disk(folder: str, what: str):
    """Turn a full disk while writing `what` into `folder` into an `OSError` that says so and names the place (PyTorch's
    own message is `basic_ios::clear: iostream error`); the partial folder is removed, older checkpoints are untouched."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        text = str(error)
        by_errno = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        # PyTorch's writer reports a full disk without errno; trust its message only when the disk is indeed full.
        markers = ("No space left", "iostream error", "file write failed", "inline_container")
        by_message = any(marker in text for marker in markers)
        if not (by_errno or (by_message and _disk_nearly_full(folder))):
            raise
        if folder.endswith(".tmp"):
            shutil.rmtree(folder, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"no space left on {os.path.dirname(folder)} while saving {what}; the checkpoints "
                                    "saved before it are complete: free space, then --resume_from_checkpoint latest") from error


def _disk_nearly_full(folder: str, margin: int = 64 * 2**20) -> bool:
    """True when the file system holding `folder` has less than `margin` bytes left (a write error there is a full disk)."""
    path = folder
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    usage = shutil.disk_usage(path or ".")
    return usage.free < margin
