#!/usr/bin/env bash
# The main job: set up (if needed), train a robust DDPM on the embedded digits, score its samples.
# Writes outputs/digits/: the pipeline (safetensors), samples/final.png, metrics.json, evaluation/ (the held-out
# report: restoration per corruption, generation, memorisation), README.md (model card).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_env.sh
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process "$(nproc)" \
    --mixed_precision no --dynamo_backend no \
    training/train_robust_ddpm.py --config training/configs/digits.yaml "$@"
.venv/bin/python - "$start" <<'PY'
import json, sys, time
metrics = json.load(open("outputs/digits/metrics.json"))
quality = {"samples": metrics["report"]["generation"]["samples"], **metrics["report"]["generation"]["digits"]}
print(f"steps {metrics['global_step']}, images {metrics['images_seen']}, validation loss (clean) "
      f"{metrics['validation_losses']['clean']:.4f}")
print(f"samples classified with p >= 0.8: {quality['confident_fraction']:.1%} of {quality['samples']}; "
      f"classes present: {quality['classes_present']}/10; class counts {quality['class_counts']}")
for row in metrics.get("report", {}).get("restoration", []):
    print(f"restoration {row['case']:<24} {row['method']:<8} PSNR {row['psnr_input']:5.2f} -> {row['psnr']:5.2f} dB "
          f"({row['psnr'] - row['psnr_input']:+.2f}); accuracy {row['accuracy_input']:.3f} -> {row['accuracy']:.3f}")
print(f"wall time including set-up: {time.time() - float(sys.argv[1]):.0f} s")
PY
