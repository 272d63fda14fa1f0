#!/usr/bin/env bash
# Set up the environment (if needed) and run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export NO_ALBUMENTATIONS_UPDATE=1
.venv/bin/python - <<'PY'
from diffusers_robust import RobustDDIMScheduler, build_pipeline_from_preset
pipe = build_pipeline_from_preset("pipelines/ddpm-digits-16", seed=0)
pipe.scheduler = RobustDDIMScheduler.from_config(pipe.scheduler.config)
images = pipe(batch_size=4, num_inference_steps=20).images
images[0].save("outputs-preset-sample.png")
print("wrote outputs-preset-sample.png (untrained preset)")
PY
