#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite offline on the pinned stack (constraints.txt), then
# the newest_stack tests on the newest releases pyproject.toml allows (scripts/test_newest.sh; SKIP_NEWEST_STACK=1
# leaves that part out). Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -n 2 --durations=20 "$@"
if [ "${SKIP_NEWEST_STACK:-0}" != "1" ]; then
    bash scripts/test_newest.sh
fi
