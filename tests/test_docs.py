import dataclasses
import os

from conftest import REPO_ROOT

from diffusers_robust.training_config import TrainingConfig


def test_readme_documents_every_training_option():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    missing = [f.name for f in dataclasses.fields(TrainingConfig) if f"| `{f.name}` |" not in readme]
    assert not missing, f"README lacks options {missing}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
