"""Diffusers' loading contract: `RobustDDPMPipeline.from_pretrained` loads every component through Diffusers' own loader
(as `PipelineTesterMixin.test_save_load_local` in Diffusers' repository checks) and never runs a folder's code."""

import json
import logging
import os

import pytest
import torch
from conftest import make_tiny_unet
from diffusers.utils import logging as diffusers_logging

from diffusers_robust import ConditionEmbedding, RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler

pytestmark = pytest.mark.newest_stack


def _saved(tmp_path, scheduler) -> str:
    pipe = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=scheduler,
                              condition_embedding=ConditionEmbedding(["corruption/gaussian_noise"], embedding_dim=16))
    folder = str(tmp_path / "pipe")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("scheduler", [RobustDDPMScheduler(), RobustDDIMScheduler()], ids=["ddpm", "ddim"])
def test_every_component_is_loaded_by_diffusers_own_loader(tmp_path, scheduler, caplog):
    folder = _saved(tmp_path, scheduler)
    diffusers_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO, logger="diffusers.pipelines.pipeline_loading_utils"):
            pipe = RobustDDPMPipeline.from_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity_warning()
    for name, cls in (("unet", "UNet2DModel"), ("scheduler", type(scheduler).__name__),
                      ("condition_embedding", "ConditionEmbedding")):
        assert f"Loaded {name} as {cls}" in caplog.text
    assert type(pipe.scheduler) is type(scheduler) and isinstance(pipe.condition_embedding, ConditionEmbedding)


def test_torch_dtype_reaches_this_packages_components_as_diffusers_applies_it(tmp_path):
    pipe = RobustDDPMPipeline.from_pretrained(_saved(tmp_path, RobustDDPMScheduler()), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.condition_embedding.dtype == torch.bfloat16


def test_a_folders_code_files_are_never_run(tmp_path):
    folder = _saved(tmp_path, RobustDDPMScheduler())
    trap = str(tmp_path / "ran")
    code = f"open({trap!r}, 'w').close()\nfrom diffusers_robust import RobustDDPMScheduler\n"
    for path in os.listdir(os.path.join(folder, "scheduler")) + ["../pipeline.py"]:
        if path.endswith(".py"):
            with open(os.path.join(folder, "scheduler", path), "w") as handle:
                handle.write(code)
    RobustDDPMPipeline.from_pretrained(folder)
    assert not os.path.exists(trap)
    # A file named after the module the loader imports from would be run by Diffusers: refused, naming it.
    with open(os.path.join(folder, "scheduler", "diffusers_robust.pipelines.components.py"), "w") as handle:
        handle.write(code)
    with pytest.raises(ValueError, match="never runs a folder's code"):
        RobustDDPMPipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="drop trust_remote_code"):
        RobustDDPMPipeline.from_pretrained(folder, trust_remote_code=True)
    assert not os.path.exists(trap)


@pytest.mark.parametrize("class_name", ["apply_corruption", "TrainingConfig", "RobustDDPMPipeline", "NoSuchClass"])
def test_a_model_index_naming_something_that_is_not_a_component_is_refused_naming_it(tmp_path, class_name):
    folder = _saved(tmp_path, RobustDDPMScheduler())
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as handle:
        index = json.load(handle)
    index["scheduler"] = ["diffusers_robust", class_name]
    with open(index_path, "w") as handle:
        json.dump(index, handle)
    with pytest.raises(ValueError, match=f"names '{class_name}' from diffusers_robust, which is not one of its pipeline"):
        RobustDDPMPipeline.from_pretrained(folder)
