import dataclasses
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT

from diffusers_robust.training.config import TrainingConfig, help_texts


def test_readme_documents_every_training_option_with_its_help_text():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    helps = help_texts()
    assert not [name for name, text in helps.items() if "|" in text], "a '|' would split the README table cell"
    rows = {name: re.search(rf"^\| `{name}` \| `[^`]*` \| (.*) \|$", readme, re.MULTILINE)
            for name in (f.name for f in dataclasses.fields(TrainingConfig))}
    missing = [name for name, row in rows.items() if row is None]
    assert not missing, f"README lacks options {missing}"
    stale = [name for name, row in rows.items() if row.group(1) != helps[name]]
    assert not stale, f"README rows differ from --help for {stale}"


def test_readme_option_table_is_the_one_generated_from_the_config():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    table = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "options_table.py")], capture_output=True,
                           text=True, check=True).stdout
    assert table.count("\n") == len(dataclasses.fields(TrainingConfig)) + 2
    assert table in readme, "regenerate the README table with python scripts/options_table.py"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
