#!/usr/bin/env bash
# The photo journey, as a new user runs it from a fresh clone: set up, make held-out photos noisy and blurred as 8-bit
# PNG files, annotate the noisy folder, train the 32x32 photo prior (training/configs/photos.yaml), sample, restore the
# noisy folder with detection and the blurred one with a named blur, evaluate on the held-out photos. Each step is
# timed; the PSNR of each restored folder against the clean files is printed at the end.
# Writes outputs/photo-journey/ (the folders of each step) and outputs/photos/ (the trained pipeline).
# Extra arguments go to `train` (e.g. --max_train_steps 20 for a quick try).
set -euo pipefail
cd "$(dirname "$0")/.."
out=outputs/photo-journey
timings=()
step() {  # step NAME COMMAND...: run a command, record its wall time
    local name=$1 begin
    shift
    begin=$(date +%s)
    "$@"
    timings+=("$name $(( $(date +%s) - begin ))")
}
start=$(date +%s)
step setup bash scripts/setup_env.sh
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
cli=.venv/bin/diffusers-robust
mkdir -p "$out"
# Held-out photos (two photographs the prior never sees), clean and damaged, same file names in each folder.
step make-data bash -c "
$cli make-imperfect --dataset photos --split test --recipe clean=1.0 --output_dir $out/clean --overwrite &&
$cli make-imperfect --dataset photos --split test --recipe gaussian_noise:0.1=1.0 --output_dir $out/noisy --overwrite"
step annotate "$cli" annotate "$out/noisy/png" --output "$out/noisy-annotations.csv"
step train "$cli" train --config training/configs/photos.yaml --output_dir outputs/photos --overwrite_output_dir "$@"
step sample "$cli" sample outputs/photos --num_images 16 --output_dir "$out/samples" --overwrite
# 32 of the 192 held-out tiles: restore costs about 1 s per 32x32 tile on 2 cores
.venv/bin/python - "$out" <<'PY'
import pathlib, shutil, sys
import numpy as np, PIL.Image
out = pathlib.Path(sys.argv[1])
names = sorted(p.name for p in (out / "clean/png").rglob("*.png"))[::6][:32]
for folder in ("clean", "noisy"):
    target = out / f"{folder}-32"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for name in names:
        shutil.copy(next((out / folder / "png").rglob(name)), target / name)
blurred = out / "blurred-32"  # a blur we did not make: PIL's Gaussian blur of 1 px
shutil.rmtree(blurred, ignore_errors=True)
blurred.mkdir()
from PIL import ImageFilter
for name in names:
    PIL.Image.open(out / "clean-32" / name).filter(ImageFilter.GaussianBlur(1)).save(blurred / name)
PY
step restore-auto "$cli" restore outputs/photos "$out/noisy-32" --output_dir "$out/restored" --overwrite
step restore-blur "$cli" restore outputs/photos "$out/blurred-32" --blur_sigma 1 --output_dir "$out/deblurred" --overwrite
step evaluate "$cli" evaluate outputs/photos --dataset photos --output_dir "$out/report" --overwrite
.venv/bin/python - "$out" "$start" "${timings[@]}" <<'PY'
import json, pathlib, sys, time
import numpy as np, PIL.Image
out, start, timings = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
def psnr(folder: str) -> float:  # PSNR of the folder's mean squared error against the clean files, 8-bit
    errors = []
    for clean in sorted((out / "clean-32").glob("*.png")):
        other = next((out / folder).rglob(clean.stem + ".png"))
        a, b = (np.asarray(PIL.Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in (clean, other))
        errors.append(np.mean((a - b) ** 2))
    return float(10 * np.log10(1 / np.mean(errors)))
print(f"restore (auto) of Gaussian noise std 0.1: {psnr('noisy-32'):.2f} -> {psnr('restored'):.2f} dB")
print(f"restore --blur_sigma 1 of a PIL blur of 1 px: {psnr('blurred-32'):.2f} -> {psnr('deblurred'):.2f} dB")
metrics = json.load(open("outputs/photos/metrics.json"))
print(f"trained {metrics['global_step']} steps")
report = json.load(open(out / "report/report.json"))
for row in report["restoration"]:
    print(f"evaluate {row['case']:<24} {row['method']:<8} PSNR {row['psnr_input']:5.2f} -> {row['psnr']:5.2f} dB")
for entry in timings:
    name, seconds = entry.split()
    print(f"{name:<14} {int(seconds):>6} s")
print(f"wall time including set-up: {time.time() - start:.0f} s")
PY
