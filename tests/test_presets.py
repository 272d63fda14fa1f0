import json
import os

import pytest
import torch
from conftest import REPO_ROOT

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler, build_pipeline_from_preset

PRESETS = {  # name: (parameter count of the UNet, resolution, channels)
    "ddpm-digits": (1_112_801, 8, 1),
    "ddpm-cifar10-32": (35_746_307, 32, 3),  # Ho et al. 2020, CIFAR-10: 35.7M
    "ddpm-64": (71_436_803, 64, 3),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_untrained_pipeline_with_expected_parameter_count(name):
    params, resolution, channels = PRESETS[name]
    pipe = build_pipeline_from_preset(os.path.join(REPO_ROOT, "pipelines", name), seed=0)
    assert isinstance(pipe, RobustDDPMPipeline)
    assert isinstance(pipe.scheduler, RobustDDPMScheduler)
    assert pipe.unet.num_parameters() == params
    assert pipe.unet.config.sample_size == resolution and pipe.unet.config.in_channels == channels


@pytest.mark.parametrize("name", PRESETS)
def test_preset_folder_holds_configs_only_in_diffusers_layout(name):
    folder = os.path.join(REPO_ROOT, "pipelines", name)
    files = sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, fs in os.walk(folder) for f in fs)
    assert files == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"]
    with open(os.path.join(folder, "model_index.json")) as handle:
        assert json.load(handle)["_class_name"] == "RobustDDPMPipeline"


def test_seeded_preset_build_is_deterministic_and_leaves_global_rng_alone():
    folder = os.path.join(REPO_ROOT, "pipelines", "ddpm-digits")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_pipeline_from_preset(folder, seed=1)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_pipeline_from_preset(folder, seed=1)
    for p, q in zip(a.unet.parameters(), b.unet.parameters(), strict=True):
        assert torch.equal(p, q)


def test_digits_preset_pipeline_saves_and_loads(tmp_path):
    pipe = build_pipeline_from_preset(os.path.join(REPO_ROOT, "pipelines", "ddpm-digits"), seed=0)
    pipe.save_pretrained(tmp_path)
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path)
    assert loaded.unet.num_parameters() == PRESETS["ddpm-digits"][0]


def test_bad_preset_folder_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        build_pipeline_from_preset(tmp_path)
