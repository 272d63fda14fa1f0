#!/usr/bin/env bash
# The stack a user installs today: the launch, signal, loading, Hub and pipeline-contract tests (marker newest_stack)
# against the newest releases pyproject.toml allows (.venv-newest; torch held at the CPU build 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_newest_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
.venv-newest/bin/python -c "import accelerate, diffusers, datasets, huggingface_hub, transformers; print('newest stack:', \
', '.join(f'{m.__name__} {m.__version__}' for m in (accelerate, diffusers, datasets, huggingface_hub, transformers)))"
.venv-newest/bin/python -m pytest -n 2 -m newest_stack --durations=10 -p no:cacheprovider "$@"
