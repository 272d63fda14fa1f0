import dataclasses
import doctest
import os
import re
import subprocess
import sys

import pytest
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


class FencedDocTestParser(doctest.DocTestParser):
    """Docstring examples sit in Markdown fences (Diffusers' style): the fence lines are not expected output."""

    def parse(self, string, name="<string>"):
        lines = [line for line in string.splitlines() if line.strip() not in ("```", "```py", "```python")]
        return super().parse("\n".join(lines) + "\n", name)


def _docstring_examples():
    import importlib
    import pkgutil

    import diffusers_robust

    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    for info in pkgutil.walk_packages(diffusers_robust.__path__, "diffusers_robust."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        yield from (test for test in finder.find(module) if test.examples)


@pytest.mark.parametrize("example", list(_docstring_examples()), ids=lambda test: test.name)
def test_docstring_example_runs_as_written(example, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # examples use repository paths (presets, recipes)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(example, out=report.append)
    assert result.failed == 0, "".join(report)


def test_readme_states_the_evaluations_default_depth_as_the_code_has_it():
    from diffusers_robust.evaluation.defaults import (
        DEFAULT_RESTORATION_CASES,
        FULL_EVALUATION_IMAGES,
        QUICK_EVALUATION_IMAGES,
        QUICK_RESTORATION_CASES,
    )

    readme = " ".join(open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read().split())
    stated = re.search(r"by default (\d+) cases on (\d+) held-out images: (.*?); `--full`: (\d+) cases on (\d+) images",
                       readme)
    assert stated, "README's evaluate section lost its sentence on the default depth"
    assert (int(stated[1]), int(stated[2])) == (len(QUICK_RESTORATION_CASES), QUICK_EVALUATION_IMAGES)
    assert (int(stated[4]), int(stated[5])) == (len(DEFAULT_RESTORATION_CASES), FULL_EVALUATION_IMAGES)
    assert f"all {len(DEFAULT_RESTORATION_CASES)} cases on {FULL_EVALUATION_IMAGES} images" in readme
