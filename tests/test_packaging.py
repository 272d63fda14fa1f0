"""A non-editable install of the project imports the public classes and installs no stray top-level modules."""

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_public_classes(tmp_path):
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), REPO_ROOT],
        check=True, cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("diffusers_robust-*.whl")
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top_level == {"diffusers_robust", wheel.name.split("-py3")[0] + ".dist-info"}

    # A fresh venv whose only view of the dependencies is this environment's site-packages (no network).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    fresh_site = subprocess.run(
        [fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with open(os.path.join(fresh_site, "deps.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([fresh_python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    probe = (
        "import diffusers_robust, os; "
        "from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler, RobustDDIMScheduler; "
        "from diffusers_robust.pipelines.presets import available_presets, build_pipeline_from_preset, preset_root; "
        "assert build_pipeline_from_preset('ddpm-digits').unet.config.sample_size == 8; "
        "print(os.path.dirname(diffusers_robust.__file__)); print(preset_root()); print(sorted(available_presets()))"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run([fresh_python, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    package, presets, names = out.stdout.strip().splitlines()
    assert package.startswith(str(venv)) and presets == os.path.join(package, "presets")  # installed with the package
    assert names == "['ddpm-64', 'ddpm-cifar10-32', 'ddpm-digits', 'ddpm-photos-32']"
