"""Nothing of the user's is ever lost: every command that writes a folder refuses one holding the user's files, one
that overlaps its inputs, and the folder it runs in; replaces an earlier result only with --overwrite; and writes
through a staging folder, so an interrupted run leaves the earlier result or nothing."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from conftest import make_tiny_unet, training_env, wait_for

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.cli import main as cli_main
from diffusers_robust.output_folders import MARKER_FILE, OutputFolderError, staged_output_folder


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("pipe") / "model")
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=50)).save_pretrained(folder)
    return folder


def _images(folder, count: int, suffix: str = ".png") -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        paths.append(os.path.join(folder, f"img_{index:03d}{suffix}"))
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(paths[-1])
    return paths


def _snapshot(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_make_imperfect_into_the_current_folder_is_refused_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("years of work")
    before = _snapshot(tmp_path)
    code = cli_main(["make-imperfect", "--recipe", "gaussian_noise:0.2=1", "--split", "test", "--output_dir", "."])
    assert code == 2 and "is the folder this command runs in" in _error(capsys)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_folder_holding_the_users_files_is_refused_even_with_overwrite(tmp_path, capsys, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = cli_main(["make-imperfect", "--recipe", "gaussian_noise:0.2=1", "--split", "test", "--output_dir", str(out),
                     *overwrite])
    assert code == 2 and "holds files diffusers-robust did not write (notes.txt)" in _error(capsys)
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_an_earlier_result_is_replaced_whole_only_with_overwrite(tmp_path, capsys):
    out = str(tmp_path / "imperfect")
    args = ["make-imperfect", "--recipe", "gaussian_noise:0.2=1", "--split", "test", "--output_dir", out]
    assert cli_main([*args, "--seed", "0"]) == 0
    first = _snapshot(out)
    assert json.loads(first[MARKER_FILE])["command"] == "make-imperfect"
    assert cli_main([*args, "--seed", "1"]) == 2 and "pass --overwrite to replace it" in _error(capsys)
    assert _snapshot(out) == first
    assert cli_main([*args, "--seed", "1", "--overwrite"]) == 0
    second = _snapshot(out)
    assert second.keys() == first.keys() and second["recipe.json"] != first["recipe.json"]
    # A file the user added to a result is theirs: --overwrite would delete it, so it is refused.
    with open(os.path.join(out, "png", "my_edit.png"), "wb") as handle:
        handle.write(b"x")
    assert cli_main([*args, "--overwrite"]) == 2 and "files added to it since (png/my_edit.png)" in _error(capsys)
    assert os.path.exists(os.path.join(out, "png", "my_edit.png"))
    assert not [name for name in os.listdir(tmp_path) if "staging" in name or "replaced" in name]


def test_restore_into_its_input_folder_is_refused_and_the_originals_stay(tmp_path, pipeline_folder, capsys):
    inputs = tmp_path / "photos"
    _images(inputs, 3)
    before = _snapshot(inputs)
    for output in (inputs, inputs / "restored"):
        code = cli_main(["restore", pipeline_folder, str(inputs), "--noise_sigma", "0.1", "--output_dir", str(output)])
        assert code == 2 and "overlap" in _error(capsys)
    assert _snapshot(inputs) == before


def test_two_inputs_restored_to_one_name_are_refused_naming_both(tmp_path, pipeline_folder, capsys):
    inputs = tmp_path / "photos"
    _images(inputs, 1, ".png")
    _images(inputs, 1, ".bmp")
    code = cli_main(["restore", pipeline_folder, str(inputs), "--noise_sigma", "0.1", "--output_dir", str(tmp_path / "o")])
    line = _error(capsys)
    assert code == 2 and "img_000.bmp" in line and "img_000.png -> img_000.png" in line
    assert not (tmp_path / "o").exists()


def test_sample_into_a_used_folder_holds_one_result_never_two(tmp_path, pipeline_folder, capsys):
    out = str(tmp_path / "samples")
    args = ["sample", pipeline_folder, "--num_inference_steps", "2", "--output_dir", out]
    assert cli_main([*args, "--num_images", "6"]) == 0
    assert cli_main([*args, "--num_images", "2", "--seed", "99"]) == 2 and "--overwrite" in _error(capsys)
    assert cli_main([*args, "--num_images", "2", "--seed", "99", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == sorted([MARKER_FILE, "grid.png", "image-00000.png", "image-00001.png"])
    grid = np.asarray(PIL.Image.open(os.path.join(out, "grid.png")))  # 2 samples side by side, a grey gap between
    width = (grid.shape[1] - 2) // 2
    assert (grid[:, width:width + 2] == 128).all()


def test_evaluate_may_write_inside_the_pipeline_folder_but_never_replace_it(tmp_path, pipeline_folder, capsys):
    code = cli_main(["evaluate", pipeline_folder, "--output_dir", pipeline_folder, "--num_samples", "4"])
    assert code == 2 and f"would replace {pipeline_folder}" in _error(capsys)
    assert os.path.isfile(os.path.join(pipeline_folder, "model_index.json"))


def test_a_failure_inside_the_staged_block_leaves_the_earlier_result(tmp_path):
    out = str(tmp_path / "result")
    with staged_output_folder(out, "sample") as staging:
        open(os.path.join(staging, "a.png"), "wb").write(b"first")
    with pytest.raises(RuntimeError), staged_output_folder(out, "sample", overwrite=True) as staging:
        open(os.path.join(staging, "a.png"), "wb").write(b"second")
        raise RuntimeError("the disk went away")
    assert open(os.path.join(out, "a.png"), "rb").read() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["result"]
    with pytest.raises(OutputFolderError, match="is a file"):
        check = tmp_path / "file"
        check.write_text("x")
        with staged_output_folder(str(check), "sample"):
            pass


@pytest.mark.slow
def test_ctrl_c_in_restore_is_one_line_and_leaves_no_half_folder(tmp_path, pipeline_folder):
    inputs = tmp_path / "photos"
    _images(inputs, 3000)
    out = tmp_path / "restored"
    command = [sys.executable, "-m", "diffusers_robust", "restore", pipeline_folder, str(inputs), "--noise_sigma", "0.1",
               "--batch_size", "1", "--output_dir", str(out)]
    # pytest-xdist workers ignore SIGINT, and a child inherits that: give the command the default, as a shell does.
    process = subprocess.Popen(command, env=training_env(), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: any(name.startswith(".restored.staging-") and len(os.listdir(tmp_path / name)) >= 5
                         for name in os.listdir(tmp_path)), timeout=120)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"diffusers-robust restore: interrupted; {out} is as it was"
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_a_fresh_training_run_refuses_a_folder_holding_the_users_files(tiny_preset, tmp_path):
    from conftest import run_training_script, tiny_training_args

    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my project notes")
    result = run_training_script(tiny_training_args(tiny_preset, out, max_train_steps=1), timeout=120)
    assert result.returncode == 2 and "holds files no training run wrote (README.md)" in result.stderr
    assert sorted(os.listdir(out)) == ["README.md"] and (out / "README.md").read_text() == "my project notes"
