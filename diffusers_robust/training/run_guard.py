"""What keeps a training run's output folder whole: one writer at a time (a kernel-held file lock), a fresh run never mixing with
another run's checkpoints, a resume that cannot silently change what the checkpoint was trained with, and signals that
stop the run at a step boundary with a checkpoint instead of losing the work since the last one."""

import contextlib
import ctypes
import dataclasses
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml

from ..data.splits import looks_like_path
from .checkpoints import checkpoints_dir, complete_checkpoints
from .config import TrainingConfig, resumable_options

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
CONFIG_FILE = "training_config.yaml"
class OutputDirBusy(RuntimeError):
    """Another live run holds `output_dir`'s lock."""


class OutputDirLock:
    """
    One writer per output folder: an exclusive `fcntl.flock` on `output_dir/.lock`, held on the open file for the whole
    run. The kernel releases it when the process ends, however it ends (a crash, SIGKILL, a restarted container with the
    same host name and pid), so there is no stale lock to guess about. The file names the holder (`host:pid`) for the
    message a second run gets.

    On shared storage, NFS releases a lock of a machine that went away when that client's lease expires (about 90 s).
    A file system that keeps it (or does not support locks: then the run warns that nothing stops a second writer) is
    unlocked by deleting `output_dir/.lock`, once the run that held it has surely stopped.
    """

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._handle = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> "OutputDirLock":
        """Take the lock or raise `OutputDirBusy` naming the holder; never waits."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            # O_NOFOLLOW: a `.lock` that is a link is refused (ELOOP), never followed to write elsewhere.
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o644)
            handle = os.fdopen(descriptor, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                for _ in range(50):  # the holder writes its name just after it locks: give it up to 0.5 s
                    handle.seek(0)
                    holder = handle.read().strip()
                    if holder:
                        break
                    time.sleep(0.01)
                holder = holder or "unknown"
                handle.close()
                elsewhere = "" if holder.startswith(f"{socket.gethostname()}:") else (
                    f"; if that machine is gone, NFS frees its lock within about 90 s, or delete {self.path} once its "
                    "run has surely stopped")
                raise OutputDirBusy(f"another run (process {holder}) is writing to {os.path.dirname(self.path)}; wait "
                                    f"for it, stop it, or use another output_dir{elsewhere}") from None
            except OSError as error:  # ENOLCK / EOPNOTSUPP: a file system without locks
                logger.warning("%s: this file system does not support locks (%s); nothing stops a second run from "
                               "writing to the same output_dir", self.path, error.strerror)
            if self._same_file(handle):  # not unlinked by a releasing holder between our open and our lock
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(self.owner)
        handle.flush()
        self._handle = handle
        return self

    def _same_file(self, handle) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Delete the file, then unlock (a run waiting to lock the old file sees it unlinked and opens a new one)."""
        if self._handle is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self._handle.close()
        self._handle = None


# What a training run writes into its output_dir; a folder holding none of the first three holds no run's output.
RUN_OUTPUTS = ("training_config.yaml", "checkpoints", "model_index.json", LOCK_FILE, "logs", "samples", "unet",
               "scheduler", "condition_embedding", "evaluation", "metrics.json", "README.md", "pipeline.py", ".export.tmp")


def prepare_fresh_output_dir(output_dir: str, overwrite: bool) -> None:
    """A fresh run (no `resume_from_checkpoint`) must not write beside another run's checkpoints: their rotation and
    `latest` would mix the two runs. `ValueError` naming them, unless `overwrite` (then they are deleted first). A
    folder that holds files but no run's output (the user's: the export would replace a `README.md`) is refused,
    `overwrite` or not."""
    present = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if present and not set(present) & set(RUN_OUTPUTS[:3]) and set(present) - {LOCK_FILE}:
        others = [name for name in present if name != LOCK_FILE]
        raise ValueError(f"output_dir {output_dir} holds files no training run wrote ({', '.join(others[:4])}"
                         f"{' ...' if len(others) > 4 else ''}); they are never replaced: name an empty or new folder")
    found = complete_checkpoints(output_dir)
    if not found:
        return
    if not overwrite:
        names = ", ".join(os.path.basename(path) for path in found)
        raise ValueError(f"{output_dir} holds another run's checkpoints ({names}): resume it with --resume_from_checkpoint "
                         "latest, pick another output_dir, or pass --overwrite_output_dir to delete them")
    logger.warning("overwrite_output_dir: deleting %d checkpoint(s) of the previous run in %s", len(found), output_dir)
    shutil.rmtree(checkpoints_dir(output_dir))


# Files whose contents (not only size) a fingerprint covers: annotation sidecars and other small metadata, where an edit
# of one value (noise 0.1 -> 0.3) keeps the size. Image files are covered by name and size.
CONTENT_HASHED_SUFFIXES = (".csv", ".json", ".jsonl", ".yaml", ".yml", ".txt")


def _file_entry(path: str, relative: str) -> tuple:
    size = os.path.getsize(path)
    if not path.lower().endswith(CONTENT_HASHED_SUFFIXES):
        return (relative, size)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return (relative, size, digest.hexdigest())


def folder_fingerprint(paths: list[str], patterns: tuple[str, ...] = ("*",)) -> str:
    """16 hex digits of sha256 over the files under `paths` matching `patterns`: relative name and size in bytes, and
    the contents of annotation and metadata files (`CONTENT_HASHED_SUFFIXES`): what changes when files are added,
    removed, renamed or rewritten with another size, or an annotation is edited."""
    entries = []
    for top in paths:
        if os.path.isfile(top):
            entries.append(_file_entry(top, os.path.basename(top)))
            continue
        for root, folders, files in os.walk(top):
            folders.sort()
            for name in sorted(files):
                relative = os.path.relpath(os.path.join(root, name), top)
                if any(fnmatch.fnmatch(relative, pattern) for pattern in patterns):
                    entries.append(_file_entry(os.path.join(root, name), relative))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def run_fingerprints(pipeline_folder: str, sources: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of what a checkpoint was trained from: the preset's configs (`pipeline`) and each local data source
    by name (its file list and sizes, and the contents of its sidecar), an annotation file wherever it lies included.
    Hub ids and Datasets objects are left out: the recorded config names their revision or fingerprint, which a resume
    already compares."""
    found = {"pipeline": folder_fingerprint([pipeline_folder], ("*.json",))}
    for name, source in sources.items():
        if isinstance(source, str) and looks_like_path(source):
            expanded = os.path.expanduser(source)
            found[name] = folder_fingerprint(sorted(glob.glob(expanded)) if any(c in source for c in "*?") else [expanded])
    return found


def warn_changed_fingerprints(checkpoint: str, saved: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """Log a warning for each fingerprint that differs from the checkpoint's; returns their names."""
    changed = sorted(name for name, value in (saved or {}).items() if name in now and now[name] != value)
    for name in changed:
        what = "the pipeline preset's configs" if name == "pipeline" else f"the files of {name}"
        logger.warning("%s changed since %s was saved (files added, removed, of another size, or an annotation "
                       "edited): the resumed run continues on the new contents", what, checkpoint)
    return changed


def check_resume_config(output_dir: str, config: TrainingConfig) -> dict[str, tuple[Any, Any]]:
    """
    Compare a resumed run's options with the first run's (`output_dir/training_config.yaml`).

    Returns the changed options that may change (those marked `resumable`, `{name: (first, now)}`, for the log); raises
    `ValueError` naming any other changed option, since the checkpoint's weights, optimizer, data order or noise depend
    on it.
    """
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: cannot check that the resumed run matches the first one")
    with open(path, encoding="utf-8") as handle:
        first = yaml.safe_load(handle) or {}
    current = dataclasses.asdict(config)
    changed = {name: (first.get(name), value) for name, value in current.items() if name in first and first[name] != value}
    resumable = resumable_options(type(config))
    refused = sorted(name for name in changed if name not in resumable)
    if refused:
        details = "; ".join(f"{name}: {changed[name][0]!r} -> {changed[name][1]!r}" for name in refused)
        raise ValueError(f"cannot resume {output_dir} with changed option(s) the checkpoint depends on ({details}); "
                         "start a new run in another output_dir instead")
    return {name: values for name, values in changed.items() if name in resumable}


class TrainingStopped(BaseException):
    """SIGTERM / SIGINT: the run stopped after saving a checkpoint (at a step boundary, or during the export). Like
    `KeyboardInterrupt` it is no `Exception`, so no `except Exception` in the code it interrupts swallows it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StepAbandoned(BaseException):
    """A stop request arrived during a step's work that changes no saved state (the forward and backward passes, a
    validation): the step in progress is dropped and the last completed step is saved at once. `vouched`: a finite loss
    on the current weights was already computed (no probe needed before saving them)."""

    def __init__(self, vouched: bool = False):
        super().__init__("the step in progress was abandoned to save the last completed step")
        self.vouched = vouched


# The kernel sends this when the launcher (the parent process) dies: a real-time signal nothing else sends, so the
# launcher's death is told apart from the user's signals and always joins the stop request they caused.
PARENT_DEATH_SIGNAL = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else None
# Signals within this many seconds of the first belong to the same event (a signal to the process group reaches the
# launcher and the trainer; `timeout`, systemd and SLURM may repeat theirs); a later one is the user's second request.
STOP_GRACE_SECONDS = 3.0


class StopSignals:
    """
    SIGTERM and SIGINT ask the run to stop with a checkpoint; `requested` names the signal and `exit_code` is 128 + its
    number. One event often delivers several signals, which join that one request: any within `STOP_GRACE_SECONDS` of
    the first, and the launcher's death (the kernel's parent-death signal, asked for here on Linux) at any time. A SIGTERM
    or SIGINT later than that is a deliberate second request: the process exits at once, without a checkpoint.

    Inside [`interrupting`] (the export and report, after the last checkpoint), a request stops the work at once by
    raising `TrainingStopped` instead of waiting for a step boundary that will not come. Inside [`abandoning`] (the
    parts of a step that change no saved state: forward and backward passes), it raises `StepAbandoned`, so the last
    completed step is saved at once, within a launcher's grace (Accelerate 1.16 kills its child 5 s after a SIGTERM),
    instead of after the step in progress. Python runs a handler only between bytecodes, after a long C++ call such as a
    backward pass returns; so a watcher thread, woken through `signal.set_wakeup_fd` the moment the signal arrives, runs
    the block's `early_save` (saving the last completed step, whose weights that pass does not change) while the pass
    finishes, and the block then raises `StepAbandoned`.
    """

    def __init__(self):
        self.requested: str | None = None
        self._number = 0
        self._first_at = 0.0
        self._interrupting: str | None = None
        self._abandoning = False
        self._previous: dict[int, Any] = {}
        self._state = threading.Lock()  # the watcher's early save against the main thread leaving an `abandoning` block
        self._early_save: Callable[[], None] | None = None
        self._saved_early = False
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup_fd = -1

    def install(self) -> "StopSignals":
        numbers = [signal.SIGTERM, signal.SIGINT] + ([PARENT_DEATH_SIGNAL] if PARENT_DEATH_SIGNAL else [])
        for number in numbers:
            self._previous[number] = signal.signal(number, self._handle)
        if PARENT_DEATH_SIGNAL:
            try:  # PR_SET_PDEATHSIG = 1
                ctypes.CDLL(None, use_errno=True).prctl(1, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
            except (AttributeError, OSError):
                pass
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)
        threading.Thread(target=self._watch, args=(reader, set(numbers)), name="stop-signal-watcher", daemon=True).start()
        return self

    def _watch(self, reader: socket.socket, numbers: set[int]) -> None:
        """The watcher thread: on a stop signal, run the current `abandoning` block's `early_save` once."""
        while True:
            try:
                received = reader.recv(64)
            except OSError:
                return
            if not received:
                return
            if not numbers.intersection(received):
                continue
            with self._state:
                if self._early_save is not None and not self._saved_early:
                    try:
                        self._early_save()
                        self._saved_early = True
                    except Exception:  # the main thread saves (or reports) after the step instead
                        logger.exception("saving the last completed step early failed; it is saved after the pass")

    @property
    def exit_code(self) -> int:
        return 128 + self._number if self.requested else 0

    def _handle(self, number: int, frame) -> None:
        parent_died = number == PARENT_DEATH_SIGNAL
        name = "SIGTERM" if parent_died else signal.Signals(number).name
        if self.requested is None:
            self.requested, self._number, self._first_at = name, signal.SIGTERM if parent_died else number, time.monotonic()
            cause = " (the launcher, this process's parent, died)" if parent_died else ""
            logger.warning("%s received%s: saving a checkpoint of the last completed step, then stopping (send it again "
                           "after %g s to exit at once, without a checkpoint)", name, cause, STOP_GRACE_SECONDS)
        elif parent_died or time.monotonic() - self._first_at < STOP_GRACE_SECONDS:
            logger.info("%s%s joins the stop already requested", name, " (the launcher died)" if parent_died else "")
            return
        else:
            logger.error("second %s: exiting now, without a checkpoint", name)
            os._exit(128 + number)
        if self._interrupting is not None:
            self._raise()
        if self._abandoning:
            self._abandoning = False
            raise StepAbandoned()

    def _raise(self) -> None:
        where, self._interrupting = self._interrupting, None
        raise TrainingStopped(f"stopped by {self.requested} {where}", self.exit_code)

    @contextlib.contextmanager
    def interrupting(self, where: str):
        """Within this block a stop request raises `TrainingStopped("stopped by <signal> <where>")` at once (also one
        that came before the block)."""
        self._interrupting = where
        try:
            if self.requested is not None:
                self._raise()
            yield
        finally:
            self._interrupting = None

    @contextlib.contextmanager
    def abandoning(self, enabled: bool = True, early_save: Callable[[], None] | None = None):
        """Within this block (when `enabled`) a stop request raises `StepAbandoned` (also one that came before the
        block): at once where Python can run its handler, at the block's end after `early_save` ran on the watcher
        thread where it cannot (a long C++ call). Only for work that changes none of the state a checkpoint saves, and
        only where no other process waits in a collective for this one (a single process)."""
        if not enabled:
            yield
            return
        if self.requested is not None:
            raise StepAbandoned()
        with self._state:
            self._early_save, self._saved_early = early_save, False
        self._abandoning = True
        try:
            yield
        finally:
            self._abandoning = False
            with self._state:  # waits for an early save under way
                self._early_save, saved_early = None, self._saved_early
        if saved_early:
            raise StepAbandoned(vouched=True)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            for end in self._wakeup:
                end.close()
            self._wakeup = None
