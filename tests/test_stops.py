"""Stops and restarts as clusters and containers do them: a signal to the whole process group, a launcher that dies, a
trainer that is PID 1, a stop during the export, a diverged last step, a restarted container's lock, two runs racing
for one folder, a resume from an older checkpoint, a damaged newest checkpoint, a full disk while writing weights.
The whole-run cases run the real training script (through a real `accelerate launch` where the launcher matters)."""

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import (
    SCRIPT,
    can_mount_tmpfs,
    make_tiny_unet,
    process_alive,
    tiny_training_args,
    training_env,
    wait_for,
)
from conftest import (
    run_training_script as _run,
)

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.cli import main as cli_main
from diffusers_robust.data.datasets import ImageRecordTransform
from diffusers_robust.training.checkpoints import (
    complete_checkpoints,
    explain_full_disk,
    file_crc32,
    read_checkpoint_metadata,
    staged_export,
)
from diffusers_robust.training.run_guard import OutputDirBusy, OutputDirLock


# ---------------------------------------------------------------------------------------------------------------- lock
def test_a_lock_file_naming_a_live_process_but_not_locked_is_taken(tmp_path):
    # A restarted container has the same host name and often the same pid as the run that wrote the file.
    (tmp_path / ".lock").write_text(f"{socket.gethostname()}:{os.getpid()}")
    lock = OutputDirLock(str(tmp_path)).acquire()
    assert lock.held and (tmp_path / ".lock").read_text() == f"{socket.gethostname()}:{os.getpid()}"
    lock.release()
    assert not (tmp_path / ".lock").exists()


def _try_lock(folder: str, start: multiprocessing.Event, results) -> None:
    start.wait()
    try:
        lock = OutputDirLock(folder).acquire()
    except OutputDirBusy as error:
        results.put(("busy", str(error)))
        return
    results.put(("held", os.getpid()))
    time.sleep(1.0)  # hold it while the others try
    lock.release()


@pytest.mark.slow
def test_racing_runs_get_one_holder_and_the_others_are_told_who_holds_it(tmp_path):
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_try_lock, args=(str(tmp_path), start, results)) for _ in range(12)]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    held = [value for kind, value in outcomes if kind == "held"]
    assert len(held) == 1
    busy = [value for kind, value in outcomes if kind == "busy"]
    assert len(busy) == 11 and all(f"another run (process {socket.gethostname()}:" in message for message in busy)
    assert not (tmp_path / ".lock").exists()  # released by its only holder


@pytest.mark.slow
def test_the_kernel_releases_the_lock_of_a_killed_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from diffusers_robust.training.run_guard import OutputDirLock; "
        f"lock = OutputDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirBusy, match=f"process {socket.gethostname()}:{holder.pid}"):
            OutputDirLock(str(tmp_path)).acquire()
        holder.kill()
        holder.wait(timeout=30)
        OutputDirLock(str(tmp_path)).acquire().release()  # the file is still there; nobody locks it any more
    finally:
        holder.kill()


# ------------------------------------------------------------------------------------------------- durable files

def test_an_export_that_fails_leaves_the_previous_export_whole(tmp_path):
    with staged_export(str(tmp_path)) as folder:
        for name in ("model_index.json", "metrics.json"):
            open(os.path.join(folder, name), "w").write("first")
        os.makedirs(os.path.join(folder, "unet"))
        open(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"), "w").write("first")
    with pytest.raises(OSError, match=f"no space left on {tmp_path} while saving the exported pipeline"):
        with staged_export(str(tmp_path)) as folder:
            os.makedirs(os.path.join(folder, "unet"))
            open(os.path.join(folder, "unet", "config.json"), "w").write("second")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "metrics.json").read_text() == "first" and not (tmp_path / "unet" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "model_index.json", "unet"]  # no staging folder left


def test_a_full_disk_while_safetensors_writes_is_an_oserror_naming_the_folder(tmp_path):
    from safetensors.torch import save_file

    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        folder = disk / "checkpoints" / "checkpoint-5.tmp"
        folder.mkdir(parents=True)
        with pytest.raises(OSError, match=f"no space left on {disk / 'checkpoints'} while saving checkpoint-5"):
            with explain_full_disk(str(folder), "checkpoint-5"):
                save_file({"weight": torch.zeros(2**20)}, str(folder / "model.safetensors"))  # 4 MiB on 1 MiB
        assert not folder.exists()  # the partial save is gone
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------- values refused
@pytest.fixture(scope="module")
def tiny_pipeline() -> RobustDDPMPipeline:
    pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=8, channels=1), scheduler=RobustDDPMScheduler(100))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_eta_nan_and_a_nan_mask_are_refused_by_name(tiny_pipeline):
    with pytest.raises(ValueError, match="eta must be a finite number >= 0 .*got nan"):
        tiny_pipeline(batch_size=1, num_inference_steps=2, eta=float("nan"))
    image = np.full((1, 8, 8, 1), 0.5, dtype=np.float32)
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[0, 0] = np.nan
    with pytest.raises(ValueError, match="mask holds NaN or infinite values"):
        tiny_pipeline(image=image, mask=mask, num_inference_steps=2, output_type="np")


def test_a_float_tiff_with_nan_is_a_bad_record_not_a_black_image(tmp_path):
    pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    pixels[3, 3] = np.nan
    PIL.Image.fromarray(pixels, mode="F").save(tmp_path / "nan.tiff")
    transform = ImageRecordTransform(image_column="image", channels=1, resolution=8)
    record = transform.record({"path": str(tmp_path / "nan.tiff"), "bytes": None}, 0)
    assert not record["valid"] and "NaN or infinite" in record["record_id"]


def test_a_device_this_machine_lacks_is_one_line_and_exit_2(tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code = cli_main(["sample", str(tmp_path / "no-pipeline"), "--device", "cuda:7", "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2 and "--device cuda:7" in error and "Traceback" not in error


def test_a_full_disk_in_a_command_is_one_line_with_exit_1_not_bad_input(tmp_path, capsys):
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=8, channels=1), scheduler=RobustDDPMScheduler(100))
    pipe.save_pretrained(tmp_path / "pipe")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=4k"], capture_output=True)  # fills it
        code = cli_main(["sample", str(tmp_path / "pipe"), "--num_images", "2", "--num_inference_steps", "2",
                         "--output_dir", str(disk / "samples")])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # after the progress bars
    assert code == 1 and last.startswith("diffusers-robust sample: failed:") and "No space left on device" in last
    assert "Traceback" not in error


# ------------------------------------------------------------------------------------------------- whole runs


class _Output:
    """A child's merged stdout/stderr, read on a thread so the test can wait for a line while the child runs."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process) -> None:
        for line in process.stdout:
            self.text += line

    def finish(self, timeout: float = 120) -> str:
        self._thread.join(timeout)
        return self.text


def _slow_steps(preset: str, out, **overrides) -> list[str]:
    """Full-batch steps of about 2.5 s (two micro-batches of the 1497 training digits), checkpoints every 2 steps."""
    return tiny_training_args(preset, out, train_batch_size=1497, gradient_accumulation_steps=2, max_train_steps=1000,
                              checkpointing_steps=2, validation_steps=100000, lr_warmup_steps=0, **overrides)


def _launch(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.slow
@pytest.mark.newest_stack
@pytest.mark.parametrize("into_step", [0.15, 0.7], ids=["forward", "backward"])
def test_a_group_sigterm_mid_step_saves_the_last_completed_step_within_the_launchers_grace(tmp_path, into_step):
    """Steps longer than Accelerate 1.16's 5 s between its SIGTERM and its SIGKILL: finishing the step in progress
    would be killed, so the step is dropped and the last completed one saved at once: from the signal handler during
    the forward pass, from the watcher thread during the backward pass (one C++ call, which Python cannot interrupt).
    While it runs, a second run into the folder is refused naming it; after the stop, the run resumes from the save.
    `pytest -s -n 0 -k mid_step` prints the figures the README's launcher rows give."""
    import accelerate
    import accelerate.commands.launch as accelerate_launch

    out = tmp_path / "out"
    # The digits preset's UNet on every training digit at 12x12 in one batch: steps of 5-15 s on one thread.
    args = tiny_training_args("ddpm-digits", out, train_batch_size=1497, resolution=12, max_train_steps=1000,
                              checkpointing_steps=1000, validation_steps=1, lr_warmup_steps=0)
    launcher = _launch([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *args],
                       training_env(ACCELERATE_USE_CPU="1"))
    output = _Output(launcher)
    try:
        wait_for(lambda: (out / ".lock").exists() and ":" in (out / ".lock").read_text())
        trainer = int((out / ".lock").read_text().rsplit(":", 1)[1])
        if into_step < 0.5:  # one launch checks the lock: the second run is told who holds the folder
            second = _run(tiny_training_args("ddpm-digits", out, max_train_steps=2))
            assert second.returncode == 2 and f"another run (process {socket.gethostname()}:{trainer})" in second.stderr
        wait_for(lambda: (out / "samples" / "step-1.png").exists())  # a grid per step marks each step's end
        done = max(int(p.stem.split("-")[1]) for p in (out / "samples").glob("step-*.png"))
        wait_for(lambda: (out / "samples" / f"step-{done + 1}.png").exists())
        last = done + 1  # the last completed step; the next one is under way
        step_seconds = (out / "samples" / f"step-{last}.png").stat().st_mtime - \
            (out / "samples" / f"step-{done}.png").stat().st_mtime
        time.sleep(max(0.0, (out / "samples" / f"step-{last}.png").stat().st_mtime + step_seconds * into_step - time.time()))
        signalled = time.time()
        os.killpg(launcher.pid, signal.SIGTERM)  # systemd, SLURM, `timeout`, Ctrl-C: the launcher and the trainer
        launcher.wait(timeout=120)
        launcher_exit = time.time()
        wait_for(lambda: not process_alive(trainer), timeout=30)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = output.finish()
    saved = out / "checkpoints" / f"checkpoint-{last}"
    assert (saved / "checkpoint.json").exists(), f"steps of {step_seconds:.1f} s; no checkpoint-{last}:\n{text[-3000:]}"
    # The stop line, or (the launcher killed the trainer in its backward pass) the watcher's early-save line.
    assert f"stopped by SIGTERM at step {last}; saved {saved}" in text or \
        f"saved {saved} (step {last}, the last completed)" in text
    assert "exiting now, without a checkpoint" not in text  # the launcher's signal or death joins the first
    metadata = json.loads((saved / "checkpoint.json").read_text())
    assert metadata["batches_consumed"] == last  # one batch a step: the dropped step's batch comes again
    assert not list((out / "checkpoints").glob("*.tmp"))
    OutputDirLock(str(out)).acquire().release()  # not held (a killed trainer's lock file may remain; the kernel freed it)
    saved_after = (saved / "checkpoint.json").stat().st_mtime - signalled
    print(f"accelerate {accelerate.__version__}, SIGTERM {into_step:.0%} into a step: steps of {step_seconds:.1f} s; "
          f"checkpoint of the last completed step {saved_after:.1f} s after the SIGTERM; launcher exit "
          f"{launcher.returncode} after {launcher_exit - signalled:.1f} s")
    assert saved_after < 5.0
    if hasattr(accelerate_launch, "_terminate_process_tree"):  # 1.16+: it waits for the trainer
        assert launcher.returncode == 128 + signal.SIGTERM and launcher_exit >= signalled + saved_after
    if into_step > 0.5:  # the run goes on from the save: the dropped step is trained again
        resumed = _run([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", str(last + 1),
                        "--validation_steps", "1000"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert json.loads((out / "metrics.json").read_text())["global_step"] == last + 1


@pytest.mark.slow
@pytest.mark.newest_stack
def test_a_trainer_that_is_pid_1_of_a_container_stops_on_sigterm_with_a_checkpoint(tiny_preset, tmp_path):
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here (needs root)")
    out = tmp_path / "out"
    # PID 1 ignores every signal it has no handler for (`docker stop` on a bare `accelerate launch` waits, then kills).
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "diffusers_robust", "train",
               *_slow_steps(tiny_preset, out)]
    container = subprocess.Popen(command, env=training_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(container)
    try:
        wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().endswith(":1"))
        init = int(open(f"/proc/{container.pid}/task/{container.pid}/children").read().split()[0])
        time.sleep(3)
        os.kill(init, signal.SIGTERM)
        container.wait(timeout=120)
    finally:
        container.kill()
    text = output.finish()
    assert container.returncode == 128 + signal.SIGTERM, text[-2000:]
    saved = complete_checkpoints(str(out))  # a periodic checkpoint may come first on a loaded machine
    assert f"stopped by SIGTERM at step {saved[-1].rsplit('-', 1)[1]}; saved {saved[-1]}" in text


@pytest.mark.slow
@pytest.mark.newest_stack
def test_sigterm_during_the_report_stops_it_at_once_and_a_resume_exports(tiny_preset, tmp_path):
    out = tmp_path / "out"
    args = tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=2, report="true",
                              report_images=64, report_samples=64)
    trainer = subprocess.Popen([sys.executable, SCRIPT, *args], env=training_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = _Output(trainer)
    try:
        wait_for(lambda: "validation at step 2" in output.text)
        time.sleep(1)  # inside the report (it takes tens of seconds)
        os.kill(trainer.pid, signal.SIGTERM)
        signalled = time.monotonic()
        trainer.wait(timeout=120)
        stopped_after = time.monotonic() - signalled
    finally:
        trainer.kill()
    text = output.finish()
    assert trainer.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "stopped by SIGTERM during the export (checkpoint-2 is saved" in text and stopped_after < 15
    assert not (out / "unet").exists() and not (out / ".export.tmp").exists() and not (out / "metrics.json").exists()
    resumed = _run([*args, "--resume_from_checkpoint", "latest", "--report", "false"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2 and (out / "unet").is_dir()


@pytest.mark.slow
def test_weights_diverged_by_the_last_step_are_neither_saved_nor_exported(tiny_preset, tmp_path):
    out = tmp_path / "out"
    blown = _run(tiny_training_args(tiny_preset, out, max_train_steps=1, learning_rate=1e3, lr_warmup_steps=0,
                                    max_grad_norm="null"))
    assert blown.returncode != 0 and "the weights give a non-finite loss at step 1; not saving them" in blown.stderr
    assert complete_checkpoints(str(out)) == [] and not (out / "unet").exists()


@pytest.mark.slow
def test_ema_weights_that_sample_non_finite_images_are_not_exported(tiny_preset, tmp_path):
    """The export saves the pipeline of the run's last validation: EMA weights gone non-finite (here an EMA state
    damaged on disk, its recorded size and CRC-32 rewritten so that resume accepts it) sample non-finite images there,
    and the previous export stays as it was."""
    out = tmp_path / "out"
    args = tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=2)
    assert _run(args).returncode == 0
    checkpoint, exported = out / "checkpoints" / "checkpoint-2", (out / "unet").glob("*.safetensors")
    exported = {path.name: path.read_bytes() for path in exported}
    ema_state = checkpoint / "custom_checkpoint_0.pkl"
    state = torch.load(ema_state, weights_only=False)
    state["shadow_params"][0].fill_(float("nan"))
    torch.save(state, ema_state)
    metadata = read_checkpoint_metadata(str(checkpoint))
    metadata["files"][ema_state.name], metadata["crc32"][ema_state.name] = ema_state.stat().st_size, file_crc32(str(ema_state))
    (checkpoint / "checkpoint.json").write_text(json.dumps(metadata))
    resumed = _run([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"])
    assert resumed.returncode != 0, resumed.stderr[-2000:]
    assert "the EMA weights gave non-finite samples or held-out losses at the last validation" in resumed.stderr
    assert {path.name: path.read_bytes() for path in (out / "unet").glob("*.safetensors")} == exported
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert os.path.basename(complete_checkpoints(str(out))[-1]) == "checkpoint-3"  # the trained weights are finite


@pytest.mark.slow
def test_resuming_an_older_checkpoint_sets_the_abandoned_branch_aside_and_a_damaged_newest_is_skipped(tiny_preset, tmp_path):
    out = tmp_path / "out"
    args = tiny_training_args(tiny_preset, out, max_train_steps=4, checkpointing_steps=1, validation_steps=100,
                              checkpoints_total_limit=3)
    assert _run(args).returncode == 0
    first = read_checkpoint_metadata(str(out / "checkpoints" / "checkpoint-4"))
    assert first["parent"] is None and first["files"]["model.safetensors"] > 0
    assert all(os.path.getsize(out / "checkpoints" / "checkpoint-4" / name) == size for name, size in first["files"].items())
    # A power cut after the rename, before the data reached the disk: an empty weights file.
    open(out / "checkpoints" / "checkpoint-4" / "model.safetensors", "w").close()
    resumed = _run([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "5"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changed since" not in resumed.stderr  # same preset, same data: no fingerprint warning
    assert f"skipping the damaged checkpoint {out / 'checkpoints' / 'checkpoint-4'} (model.safetensors holds 0 bytes" \
        in resumed.stderr
    # Resumed from 3: checkpoint-4 belonged to the abandoned branch; 4 and 5 are now the new line's.
    assert [os.path.basename(p) for p in complete_checkpoints(str(out))] == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    aside = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and aside[0].name.endswith("-after-3") and os.listdir(aside[0]) == ["checkpoint-4"]
    newest, parent = (read_checkpoint_metadata(str(out / "checkpoints" / f"checkpoint-{step}")) for step in (5, 3))
    assert newest["parent"] == {"step": 3, "run_id": parent["run_id"]} and newest["run_id"] != parent["run_id"]
    # An explicit older checkpoint: the newer ones move aside too, so `latest` stays on the resumed line.
    again = _run([*args, "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-3"), "--max_train_steps", "4"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert [os.path.basename(p) for p in complete_checkpoints(str(out))] == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 4
    assert len([p for p in (out / "checkpoints").iterdir() if p.name.startswith("abandoned-")]) == 2
    shutil.rmtree(out)


@pytest.mark.slow
def test_a_resume_warns_when_the_preset_or_the_data_files_changed_under_the_same_paths(tiny_preset, tmp_path):
    preset, data = tmp_path / "preset", tmp_path / "data" / "train"
    shutil.copytree(tiny_preset, preset)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(24):
        PIL.Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(data / f"{index}.png")
    out = tmp_path / "out"
    args = tiny_training_args(str(preset), out, dataset=str(data.parent), max_train_steps=2, checkpointing_steps=2,
                              validation_steps=100, train_batch_size=8)
    assert _run(args).returncode == 0
    PIL.Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(data / "new.png")
    config = json.loads((preset / "scheduler" / "scheduler_config.json").read_text())
    (preset / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 0.03}))
    changed = _run([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"])
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "the pipeline preset's configs changed since" in changed.stderr
    assert "the files of dataset changed since" in changed.stderr
