import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_unet(sample_size: int = 8, channels: int = 1, seed: int = 0) -> UNet2DModel:
    """A 2-level UNet small enough to run hundreds of steps in a test."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return make_tiny_unet()


SCRIPT = os.path.join(REPO_ROOT, "training", "train_robust_ddpm.py")


def training_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def write_tiny_preset(folder) -> str:
    """A preset of an 8x8 grey UNet (two levels, blocks of 8 and 16 channels) for fast training tests."""
    import json
    import shutil

    from diffusers_robust import RobustDDPMScheduler

    folder = str(folder)
    make_tiny_unet(sample_size=8, channels=1).save_config(os.path.join(folder, "unet"))
    RobustDDPMScheduler(num_train_timesteps=100).save_config(os.path.join(folder, "scheduler"))
    shutil.copy(os.path.join(REPO_ROOT, "pipelines", "ddpm-digits", "model_index.json"), folder)
    with open(os.path.join(folder, "model_index.json")) as handle:
        assert json.load(handle)["_class_name"] == "RobustDDPMPipeline"
    return folder


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> str:
    return write_tiny_preset(tmp_path_factory.mktemp("tiny-preset"))


def tiny_training_args(preset: str, output_dir, **overrides) -> list[str]:
    """Command-line arguments for a seconds-long training run on digits at 8x8."""
    options = {
        "pipeline": preset, "output_dir": str(output_dir), "dataset": "digits", "train_batch_size": 16,
        "max_train_steps": 6, "checkpointing_steps": 3, "validation_steps": 3, "validation_images": 32,
        "num_inference_steps": 4, "num_grid_images": 4, "lr_warmup_steps": 2, "learning_rate": 1e-3,
        "logger": "none", "report": "false",
    }
    options.update(overrides)
    args = []
    for key, value in options.items():
        args.append(f"--{key}")
        args.extend(str(v) for v in value) if isinstance(value, list) else args.append(str(value))
    return args


def wait_for(predicate, timeout: float = 180.0) -> None:
    """Poll `predicate` every 0.1 s until it is true; `TimeoutError` after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def can_mount_tmpfs(path) -> bool:
    """Whether a small tmpfs can be mounted at `path` here (root only): the tests' full disk."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if result.returncode == 0:
        subprocess.run(["umount", str(path)], check=True)
    return result.returncode == 0


def run_training_script(args: list[str], check: bool = False, timeout: int = 300, env: dict | None = None):
    """Run `training/train_robust_ddpm.py` with `args` in a fresh process (one thread, offline); with `check`, an
    `AssertionError` carrying the end of stderr unless it exits 0. Returns the `CompletedProcess` (text output)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, SCRIPT, *args], env=env or training_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def weighted_mse(prediction, target, weights=None):
    """The tests' reference loss, written out independently of the objective: mean squared error per sample (mean over
    C, H, W), times `weights` `(B,)` when given, then averaged over the batch."""
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def built_once(tmp_path_factory, name: str, build) -> "os.PathLike":
    """The folder `name`, filled by `build(folder)` once per test session and shared by the pytest-xdist workers (a file
    lock; the pattern of xdist's docs), so a module fixture that trains is not trained again on each worker that runs one
    of its tests. Without xdist it lives in this session's own temporary folder."""
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' shared session folder
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            (folder / ".built").touch()
    return folder
