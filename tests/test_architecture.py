"""One home per idea: the robust options table, the training objective, the run summary, the package layout."""

import ast
import dataclasses
import importlib
import inspect
import json
import os
import re

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_unet, weighted_mse
from diffusers import DDIMScheduler, DDPMScheduler

import diffusers_robust
from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.corruptions import RandomCorruption
from diffusers_robust.models import ConditionEmbedding, LabelConditionedUNet
from diffusers_robust.schedulers.robust_options import ROBUST_OPTION_NAMES, ROBUST_OPTIONS
from diffusers_robust.training.config import TrainingConfig
from diffusers_robust.training.objective import RobustDiffusionObjective, min_snr_weights
from diffusers_robust.training.summary import RunSummary


@pytest.mark.parametrize("robust_class,parent", [(RobustDDPMScheduler, DDPMScheduler), (RobustDDIMScheduler, DDIMScheduler)])
def test_the_robust_options_table_lists_exactly_the_options_the_schedulers_add(robust_class, parent):
    added = set(inspect.signature(robust_class.__init__).parameters) - set(inspect.signature(parent.__init__).parameters)
    assert added == set(ROBUST_OPTION_NAMES)
    defaults = robust_class().config
    assert {option.name: defaults[option.name] for option in ROBUST_OPTIONS} == {o.name: o.default for o in ROBUST_OPTIONS}


def test_every_robust_option_is_a_training_option_defaulting_to_off_with_the_tables_help():
    fields = {item.name: item for item in dataclasses.fields(TrainingConfig)}
    for option in ROBUST_OPTIONS:
        assert fields[option.name].default == option.default
        assert fields[option.name].metadata["help"].startswith(option.help)


def test_presets_hold_the_architecture_and_schedule_but_no_robust_option():
    for preset in ("ddpm-digits", "ddpm-cifar10-32", "ddpm-64"):
        with open(os.path.join(REPO_ROOT, "pipelines", preset, "scheduler", "scheduler_config.json")) as handle:
            config = json.load(handle)
        assert {option.name: config[option.name] for option in ROBUST_OPTIONS} == {o.name: o.default for o in ROBUST_OPTIONS}


def test_the_objective_is_corrupt_then_timesteps_then_training_noise_then_min_snr_weighted_mse():
    scheduler = RobustDDPMScheduler(num_train_timesteps=100, input_perturbation=0.1)
    corruption = RandomCorruption(["gaussian_noise", "impulse_noise"], (1, 5), p=0.5)
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=3 + corruption.label_dim).eval()
    objective = RobustDiffusionObjective(scheduler, snr_gamma=5.0, corruption=corruption, augment_dim=3)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    augment = torch.rand(6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = objective(model, images, augment, torch.Generator().manual_seed(0))
        # The same chain written out, drawing from a generator with the same seed in the same order.
        generator = torch.Generator().manual_seed(0)
        corrupted, applied = corruption(images, generator=generator)
        timesteps = torch.randint(0, 100, (6,), generator=generator)
        noised = scheduler.add_training_noise(corrupted, timesteps, generator=generator)
        labels = torch.cat([augment[:, :3], corruption.labels(applied, images.device)], dim=1)
        prediction = model(noised.noisy_images, timesteps, labels)
        expected = weighted_mse(prediction, noised.target, min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0))
    assert out.applied == applied and torch.equal(out.timesteps, timesteps)
    assert out.loss.shape == (6,) and torch.equal(out.loss.mean(), expected)
    assert any(a is not None for a in applied) and any(a is None for a in applied)


def test_restoration_objective_asks_for_the_corruptions_it_was_trained_on_only():
    corruption = RandomCorruption(["gaussian_noise", "impulse_noise"], (1, 5), p=0.5)
    objective = RobustDiffusionObjective(RobustDDPMScheduler(), snr_gamma=5.0, corruption=corruption, augment_dim=2,
                                         restoration_training=True)
    labels = objective.restoration_labels("salt_and_pepper", 5, 3, torch.device("cpu"))  # an alias of impulse_noise
    embedding = ConditionEmbedding(objective.label_names, embedding_dim=4)
    assert torch.equal(labels, embedding.labels_for("impulse_noise", 5, 3))
    assert objective.restoration_labels("gaussian_blur", 3, 3, torch.device("cpu")) is None
    for severity in (0, 7, True):  # labels the model never saw in training
        with pytest.raises(ValueError, match="severity must be an integer from 1 to 5"):
            embedding.labels_for("impulse_noise", severity, 3)


def test_run_summary_round_trips_through_metrics_json_and_refuses_unknown_keys(tmp_path):
    summary = RunSummary(
        global_step=2, images_seen=8, images_seen_per_rank=[8], num_processes=1, train_batch_size_effective=4,
        mixed_precision="no", resolution=8, skipped_records=0, skipped_record_ids=[], records_decoded_this_run=8,
        parameter_checksums_per_rank=None, lr_history={1: 1e-4, 2: 2e-4}, loss_history={1: 0.5, 2: 0.4},
        validation_losses={"clean": 0.3}, validation_history={2: {"clean": 0.3}}, validation_images=4,
        scheduler_robust_options={"prediction_type": "epsilon", "input_perturbation": 0.0}, training_wall_time_seconds=1.5,
    )
    summary.save(str(tmp_path))
    assert RunSummary.load(str(tmp_path)) == summary
    assert "report" not in json.loads((tmp_path / "metrics.json").read_text())
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gloabl_step'\]"):
        RunSummary.from_dict({**summary.to_dict(), "gloabl_step": 3})


def test_saved_pipelines_name_module_paths_that_stay_importable(tmp_path):
    embedding = ConditionEmbedding(["corruption/gaussian_noise"], embedding_dim=32)
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(), condition_embedding=embedding
                       ).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers_robust.schedulers.scheduling_robust_ddpm", "RobustDDPMScheduler"]
    assert index["condition_embedding"][1] == "ConditionEmbedding"
    for module, class_name in (index["scheduler"], index["condition_embedding"]):
        assert getattr(importlib.import_module(module), class_name).__module__.startswith("diffusers_robust.")
    # Pipelines saved before the package was grouped into subpackages named top-level modules that no longer exist
    # (`diffusers_robust.scheduling_robust_ddpm`): our components are found by class name, so they still load.
    index["scheduler"] = ["diffusers_robust.scheduling_robust_ddpm", "RobustDDPMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("diffusers_robust.scheduling_robust_ddpm")
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, RobustDDPMScheduler) and isinstance(loaded.condition_embedding, ConditionEmbedding)


def test_the_public_api_is_importable_from_the_package():
    for name in diffusers_robust.__all__:
        assert getattr(diffusers_robust, name) is not None
    assert {"RobustDDPMPipeline", "RobustDiffusionObjective", "RandomCorruption", "load_image_dataset",
            "TrainingConfig"} <= set(diffusers_robust.__all__)


def test_thread_default_divides_the_cores_among_processes_and_warns_when_oversubscribed(monkeypatch, caplog):
    from diffusers_robust.training.distributed import set_thread_count

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        assert set_thread_count(None, processes=cores) == 1
        assert set_thread_count(None, processes=1) == cores == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as accelerate launch --num_cpu_threads_per_process 1 sets it
        assert set_thread_count(None, processes=1) == 1
        with caplog.at_level("WARNING"):
            assert set_thread_count(4 * cores, processes=2) == 4 * cores
        assert "oversubscribed" in caplog.text
    finally:
        torch.set_num_threads(before)


# The package's layers, lowest first: a module may import its own layer and the ones below, never one above, deferred
# imports inside functions included. `if TYPE_CHECKING:` imports never run and are allowed; so is the package root,
# whose names resolve lazily.
LAYERS = [("schedulers", "models", "data", "output_folders"), ("pipelines",), ("evaluation",), ("hub",), ("training",),
          ("cli", "__main__")]


def _layer(module: str) -> int:
    part = module.split(".")[1]
    found = [level for level, names in enumerate(LAYERS) if part in names]
    assert found, f"{module} belongs to no layer: add it to LAYERS"
    return found[0]


def _imports_that_run(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `tree` outside `if TYPE_CHECKING:` blocks."""
    found, package = [], module if is_package else module.rsplit(".", 1)[0]
    type_checking = [node for node in ast.walk(tree)
                     if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")]
    skipped = {id(inner) for block in type_checking for inner in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("diffusers_robust.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("diffusers_robust."):
                found.append((node.lineno, target))
            elif target == "diffusers_robust":  # `from diffusers_robust import x` / `from . import x` at the root
                found += [(node.lineno, f"diffusers_robust.{alias.name}") for alias in node.names
                          if alias.name in {name for names in LAYERS for name in names}]
    return found


def test_no_module_imports_a_higher_layer():
    root = os.path.join(REPO_ROOT, "diffusers_robust")
    upward = []
    for folder, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py") or (folder == root and name == "__init__.py"):
                continue
            path = os.path.join(folder, name)
            module = "diffusers_robust." + os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            for line, target in _imports_that_run(tree, module, name == "__init__.py"):
                if _layer(target) > _layer(module):
                    upward.append(f"{os.path.relpath(path, REPO_ROOT)}:{line} imports {target}")
    assert upward == []


# The longest function body (docstring excluded) the package, the training script and the benchmarks may have.
MAX_FUNCTION_LINES = 60


def _long_functions(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        lines = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            lines -= first.end_lineno - first.lineno + 1
        if lines > MAX_FUNCTION_LINES:
            found.append(f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_the_limit():
    long = []
    for top in ("diffusers_robust", "training", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(REPO_ROOT, top)):
            long += [entry for name in sorted(files) if name.endswith(".py")
                     for entry in _long_functions(os.path.join(folder, name))]
    assert long == []


def test_image_units_are_converted_by_the_one_helper_each_way():
    from diffusers_robust.data.units import to_model_range, to_unit_range

    images = torch.linspace(-1, 1, 9).reshape(1, 1, 3, 3)
    assert torch.equal(to_model_range(to_unit_range(images)), images)
    assert to_unit_range(images).min() == 0 and to_unit_range(images).max() == 1
    retyped = []
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, "diffusers_robust")):
        for name in sorted(files):
            if not name.endswith(".py") or name == "units.py":
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as handle:
                retyped += [f"{os.path.relpath(path, REPO_ROOT)}:{number}" for number, line in enumerate(handle, 1)
                            if ">>>" not in line and re.search(r"\+ 1\) / 2|\* 2(\.0)? - 1(\.0)?\b", line)]
    assert retyped == []
