"""A real `accelerate launch` with two CPU processes (gloo)."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import SCRIPT, tiny_training_args, training_env

pytestmark = [pytest.mark.slow, pytest.mark.newest_stack]  # every test here runs a real two-process `accelerate launch`

LAUNCH_TIMEOUT_SECONDS = int(os.environ.get("LAUNCH_TIMEOUT_SECONDS", "400"))


def _free_port() -> int:
    """A free port from a range of this pytest-xdist worker's own, so that workers launching at the same
    moment never get the same one (an OS-assigned port, freed and handed out again, could collide and
    join two launches into one process group, which hangs)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    start = 20000 + 2000 * worker + os.getpid() % 1000
    for port in range(start, start + 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    # `--cpu --num_processes 2` silently runs one process; this is the recipe that starts two (DESIGN.md).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), SCRIPT, *args,
    ]
    # Its own session, so that a hang can be diagnosed: SIGABRT to the whole group makes every rank print its
    # Python stack (PYTHONFAULTHANDLER) before the test fails.
    process = subprocess.Popen(command, env=training_env(ACCELERATE_USE_CPU="1", PYTHONFAULTHANDLER="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"accelerate launch hung for {LAUNCH_TIMEOUT_SECONDS} s; stacks:\n{stderr[-20000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"accelerate launch failed:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("streaming", [False, True])
def test_two_process_launch_trains_both_ranks_in_sync_with_the_right_lr(tiny_preset, tmp_path, streaming):
    steps, warmup, accumulation, batch = 6, 2, 2, 8
    args = tiny_training_args(tiny_preset, tmp_path / "out", max_train_steps=steps, lr_warmup_steps=warmup,
                              gradient_accumulation_steps=accumulation, train_batch_size=batch, validation_steps=3,
                              checkpointing_steps=3, streaming=str(streaming).lower())
    result = launch_two_processes(args)
    # The DDP wrapper was gone before the process group was destroyed (see `shutdown_distributed`).
    assert "still referenced at shutdown" not in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    # Both ranks trained on their own micro-batches: steps x accumulation x batch images each.
    assert metrics["images_seen_per_rank"] == [steps * accumulation * batch] * 2
    first, second = metrics["parameter_checksums_per_rank"]
    assert first == second
    # One LR value per optimizer step, on the schedule for `steps` steps whatever the process count.
    lr = metrics["lr_history"]
    assert len(lr) == steps
    for step in range(1, steps + 1):
        k = step - 1
        expected = 1e-3 * (k / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))))
        assert lr[str(step)] == pytest.approx(expected, abs=1e-12)
    # Only the main process wrote files: one set of outputs, checkpoints at 3 and 6.
    assert sorted(os.listdir(tmp_path / "out" / "checkpoints")) == ["checkpoint-3", "checkpoint-6"]
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_two_process_run_that_fails_exits_with_the_error_instead_of_hanging(tiny_preset, tmp_path):
    """Both ranks stop on a non-finite loss (it is gathered, so they agree) without saving the diverged weights; each
    rank tears its process group down on the way out, so the launch ends with the error rather than a hung rank."""
    args = tiny_training_args(tiny_preset, tmp_path / "out", max_train_steps=10, learning_rate=1e35, lr_warmup_steps=0,
                              lr_scheduler="constant", max_grad_norm="null", train_batch_size=8)
    with pytest.raises(AssertionError, match="launch failed") as failure:
        launch_two_processes(args)
    assert "the training loss became" in str(failure.value) and "No checkpoint was saved before it" in str(failure.value)
    assert not os.path.isdir(tmp_path / "out" / "checkpoints") or not os.listdir(tmp_path / "out" / "checkpoints")
