"""Print the README's training-option table from `TrainingConfig` (its field defaults and `help` metadata).

    python scripts/options_table.py   # paste over the table under "## Training" (tests/test_docs.py checks it)
"""

import dataclasses

import yaml

from diffusers_robust.training.config import TrainingConfig


def default_text(item: dataclasses.Field) -> str:
    value = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


print("| option | default | meaning |\n|---|---|---|")
for item in dataclasses.fields(TrainingConfig):
    print(f"| `{item.name}` | `{default_text(item)}` | {item.metadata['help']} |")
