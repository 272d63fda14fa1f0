import dataclasses
import os
import re

from conftest import REPO_ROOT

from diffusers_robust.training_config import TrainingConfig, _help_texts


def test_readme_documents_every_training_option_with_its_help_text():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    helps = _help_texts()
    assert not [name for name, text in helps.items() if "|" in text], "a '|' would split the README table cell"
    rows = {name: re.search(rf"^\| `{name}` \| `[^`]*` \| (.*) \|$", readme, re.MULTILINE)
            for name in (f.name for f in dataclasses.fields(TrainingConfig))}
    missing = [name for name, row in rows.items() if row is None]
    assert not missing, f"README lacks options {missing}"
    stale = [name for name, row in rows.items() if row.group(1) != helps[name]]
    assert not stale, f"README rows differ from --help for {stale}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
