"""Push to and pull from a local server speaking the Hub's HTTP protocol, with the real huggingface_hub client."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, run_training_script, tiny_training_args, training_env
from hub_server import start_hub_server

pytestmark = [pytest.mark.slow, pytest.mark.newest_stack]  # whole runs pushed to a local Hub server

TOKEN = "hf_test_token_must_never_leak_0123456789"


@pytest.fixture
def hub(tmp_path):
    server, state, endpoint = start_hub_server()
    # The client reads HF_ENDPOINT at import, so every client runs in a fresh process with this environment.
    env = training_env(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"))
    yield state, env
    server.shutdown()


def run_client(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


SAMPLE = """
import numpy as np, torch
from diffusers_robust import RobustDDPMPipeline
pipe = RobustDDPMPipeline.from_pretrained({source!r})
images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save({target!r}, images)
"""


def test_push_to_hub_uploads_pipeline_and_card_only_and_loads_back_identical(tiny_preset, tmp_path, hub):
    state, env = hub
    output_dir = tmp_path / "robust-tiny"
    args = tiny_training_args(tiny_preset, output_dir, push_to_hub="true", hub_model_id="alice/robust-tiny",
                              hub_private_repo="true", logger="tensorboard")
    result = run_training_script(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    repo = state.repos["alice/robust-tiny"]
    assert repo.private
    assert set(repo.files) == {
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json", "README.md", "metrics.json", "training_config.yaml", "samples/final.png",
        "pipeline.py", "scheduler/diffusers_robust.schedulers.scheduling_robust_ddpm.py",
    }
    assert not any(name.startswith(("checkpoints/", "logs/")) for name in repo.files)
    # The token went only into Authorization headers: never printed, logged or written.
    assert TOKEN not in result.stdout + result.stderr
    for root, _, files in os.walk(output_dir):
        for name in files:
            assert TOKEN.encode() not in open(os.path.join(root, name), "rb").read(), name
    assert all(TOKEN.encode() not in body for _, _, _, body in state.requests)
    assert any(headers.get("authorization") == f"Bearer {TOKEN}" or headers.get("Authorization") == f"Bearer {TOKEN}"
               for _, _, headers, _ in state.requests)

    # Diffusers' own loader asks for trust_remote_code (the repository's pipeline.py imports the installed class);
    # RobustDDPMPipeline.download fetches exactly the files the components need and runs none of them.
    refused = subprocess.run(
        [sys.executable, "-c", "from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained('alice/robust-tiny')"],
        env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Pass `trust_remote_code=True`" in refused.stderr
    run_client(SAMPLE.format(source="alice/robust-tiny", target=str(tmp_path / "remote.npy")), env)
    run_client(SAMPLE.format(source=str(output_dir), target=str(tmp_path / "local.npy")), training_env())
    assert np.array_equal(np.load(tmp_path / "remote.npy"), np.load(tmp_path / "local.npy"))


def test_pipeline_push_to_hub_method_round_trips(hub):
    state, env = hub
    code = """
import sys; sys.path.insert(0, "tests")
from conftest import make_tiny_unet
from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
pipe = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(input_perturbation=0.1))
pipe.push_to_hub("bob/direct")
loaded = RobustDDPMPipeline.from_pretrained("bob/direct")
assert loaded.scheduler.config.input_perturbation == 0.1
# What a Diffusers user tries first: the repository's one-line pipeline.py imports the installed class.
import diffusers, pytest, torch
with pytest.raises(ValueError, match="trust_remote_code=True"):
    diffusers.DiffusionPipeline.from_pretrained("bob/direct")
generic = diffusers.DiffusionPipeline.from_pretrained("bob/direct", trust_remote_code=True)
assert type(generic) is RobustDDPMPipeline and type(generic.scheduler) is RobustDDPMScheduler
assert generic.scheduler.config.input_perturbation == 0.1
draw = lambda p: p(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
assert (draw(generic) == draw(loaded)).all()
"""
    run_client(code, env)
    assert not state.repos["bob/direct"].private
    files = state.repos["bob/direct"].files
    assert {"unet/diffusion_pytorch_model.safetensors", "pipeline.py",
            "scheduler/diffusers_robust.schedulers.scheduling_robust_ddpm.py"} <= set(files)
    assert files["pipeline.py"].decode().endswith("from diffusers_robust import RobustDDPMPipeline  # noqa: F401\n")


def test_push_command_uploads_a_restoration_trained_folder_that_loads_back_whole(tiny_preset, tmp_path, hub):
    state, env = hub
    output_dir = tmp_path / "run"
    args = tiny_training_args(tiny_preset, output_dir, max_train_steps=2, corruptions=["gaussian_noise"], corruption_p=0.5,
                              restoration_training="true", restoration_max_timestep=20, snr_gamma=5.0)
    trained = run_training_script(args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "# run" in (output_dir / "README.md").read_text()  # training named the card after its folder
    state.valid_tokens = {TOKEN}
    for extra, message in (({"HF_TOKEN": "hf_wrong"}, "refused the token (401) for bob/tiny: set HF_TOKEN to a token "
                                                      "with write access, or run `hf auth login`"),
                           ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub at http://127.0.0.1:9")):
        refused = subprocess.run([sys.executable, "-m", "diffusers_robust", "push", str(output_dir), "bob/tiny"],
                                 env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-3000:]
        assert len(refused.stderr.strip().splitlines()) == 1 and "bob/tiny" not in state.repos
    pushed = subprocess.run([sys.executable, "-m", "diffusers_robust", "push", str(output_dir), "bob/tiny", "--private"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    repo = state.repos["bob/tiny"]
    assert repo.private and {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "README.md"} <= set(repo.files)
    assert not any(name.startswith(("checkpoints/", "logs/")) for name in repo.files)
    card = (output_dir / "README.md").read_text()
    assert "# bob/tiny" in card and 'from_pretrained("bob/tiny")' in card and "# run" not in card
    assert "for 2 optimizer steps" in card and TOKEN not in pushed.stdout + pushed.stderr
    # Every component model_index.json names was uploaded: the learned restoration's label embedding too.
    assert {"condition_embedding/config.json", "condition_embedding/diffusion_pytorch_model.safetensors"} <= set(repo.files)
    loaded = run_client("from diffusers_robust import RobustDDPMPipeline\n"
                        "pipe = RobustDDPMPipeline.from_pretrained('bob/tiny')\n"
                        "print(pipe.condition_embedding.corruptions)", env)
    assert loaded.stdout.strip().splitlines()[-1] == "['gaussian_noise']"
