"""Output folders that never lose what a user had.

Every command that writes a folder (`make-imperfect`, `restore`, `sample`, `evaluate`) writes it through
[`staged_output_folder`]: the result is built in a hidden sibling folder and renamed into place when complete, so an
interrupted or failed run leaves the previous result (or nothing), never half a folder. The folder records what wrote
it in `MARKER_FILE`. Before any work, [`check_output_folder`] refuses:

- a folder holding files no command of this package wrote (the user's): never deleted, never mixed with a result;
- a folder holding an earlier result, unless `overwrite` (then that result is replaced whole; files added to it since
  are the user's, and refuse it);
- an output folder equal to, inside, or holding an input, and the folder the process runs in (or one above it).
"""

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

# Written into every output folder: which command wrote it, when, and the files it holds (relative paths).
MARKER_FILE = ".diffusers-robust-output.json"


class OutputFolderError(ValueError):
    """An output folder this command must not write (bad input: the command line names the wrong folder)."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(inner: str, outer: str) -> bool:
    """Whether real path `inner` is `outer` or lies under it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _files_under(folder: str) -> list[str]:
    found = []
    for root, _, names in os.walk(folder):
        found.extend(os.path.relpath(os.path.join(root, name), folder) for name in names)
    return sorted(found)


def read_marker(folder: str) -> dict | None:
    """The marker of a folder a command of this package wrote, or None (no marker, or an unreadable one)."""
    try:
        with open(os.path.join(folder, MARKER_FILE), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_folder(folder: str, command: str, overwrite: bool = False, inputs: Sequence[str] = (),
                        keep: Sequence[str] = ()) -> None:
    """Refuse, with an `OutputFolderError` naming the problem, an output folder that `command` must not write (see the
    module docstring). `inputs`: files and folders the command reads (no overlap either way); `keep`: folders it reads
    that the result may go inside but must not replace (a pipeline folder and its `evaluation/`)."""
    if not folder or not str(folder).strip():
        raise OutputFolderError(f"{command}: the output folder is empty; name a folder")
    target = _real(folder)
    if _within(_real(os.getcwd()), target):
        raise OutputFolderError(f"--output_dir {folder} is the folder this command runs in (or one above it); name a "
                                "new folder for the result")
    for item in inputs:
        source = _real(item)
        if _within(target, source) or _within(source, target):
            raise OutputFolderError(f"--output_dir {folder} and the input {item} overlap (one is inside the other): the "
                                    "result would overwrite or delete what it reads; name a separate folder")
    for item in keep:
        if _within(_real(item), target):
            raise OutputFolderError(f"--output_dir {folder} would replace {item}, which this command reads; name a "
                                    "folder beside or inside it")
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputFolderError(f"--output_dir {folder} is a file, not a folder")
    if not os.path.isdir(target):
        return
    present = [name for name in _files_under(target) if name != MARKER_FILE]
    if not present and not os.listdir(target):
        return
    marker = read_marker(target)
    if marker is None:
        raise OutputFolderError(f"--output_dir {folder} holds files diffusers-robust did not write ({_listed(present)}); "
                                "they are never deleted or mixed with a result: name an empty or new folder")
    if not overwrite:
        raise OutputFolderError(f"--output_dir {folder} holds an earlier result of `diffusers-robust "
                                f"{marker.get('command', '?')}` ({len(marker['files'])} files); pass --overwrite to "
                                "replace it, or name another folder")
    added = sorted(set(present) - set(marker["files"]))
    if added:
        raise OutputFolderError(f"--output_dir {folder} holds an earlier result and files added to it since "
                                f"({_listed(added)}), which --overwrite would delete; move them, or name another folder")


@contextlib.contextmanager
def staged_output_folder(folder: str, command: str, overwrite: bool = False, inputs: Sequence[str] = (),
                         keep: Sequence[str] = ()) -> Iterator[str]:
    """
    Check `folder` ([`check_output_folder`]), then yield an empty staging folder beside it to write the result into.
    When the block completes, the staging folder gets the marker and replaces `folder` (the earlier result, if
    `overwrite`, is deleted after the swap); when it raises (an error, Ctrl-C), the staging folder is removed and
    `folder` is as it was.
    """
    check_output_folder(folder, command, overwrite, inputs, keep)
    target = _real(folder)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.staging-", dir=parent)
    try:
        yield staging
        write_marker(staging, command)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700
        with _signals_held():  # Ctrl-C between the two renames would leave neither result in place
            if os.path.isdir(target):
                replaced = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.replaced-", dir=parent)
                os.replace(target, os.path.join(replaced, "old"))
                os.replace(staging, target)
            else:
                replaced = None
                os.replace(staging, target)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_marker(folder: str, command: str) -> None:
    """Record in `folder` that `command` wrote it and the files it holds now."""
    marker = {"command": command, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _files_under(folder)}
    with open(os.path.join(folder, MARKER_FILE), "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2)


def staged_path(staging: str, final: str, path: str) -> str:
    """Where a file written at `path` inside `staging` lies once the folder is in place at `final`."""
    return os.path.join(final, os.path.relpath(path, staging))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (delivered when the block ends) on the main thread; elsewhere, do nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
