"""`diffusers-robust` command line (also `python -m diffusers_robust`). Subcommands:

- `train`: train a robust DDPM (the options of `training/train_robust_ddpm.py`; several processes with
  `accelerate launch -m diffusers_robust train ...`).
- `sample PIPELINE`: generate images (a PNG grid and/or one PNG per image) with DDIM or DDPM.
- `restore PIPELINE INPUT...`: restore corrupted image files (or folders of them) with the pipeline's restoration.
- `evaluate PIPELINE`: the held-out evaluation report (restoration, generation, memorisation, losses), written as
  `report.json`, `report.md` and PNG plots.
- `push FOLDER REPO_ID`: upload a trained pipeline folder with its model card to the Hub (never checkpoints or logs).
- `annotate DATA`: estimate each training image's noise std, write the annotation sidecar and print a histogram.
- `make-imperfect`: turn a dataset into a seeded imperfect one (noisy, blurred, incomplete and clean records) with
  annotations.
- `presets`: list the named presets that `train --pipeline` starts from.

Bad input exits with code 2 and a one-line message.
"""

import argparse
import errno
import json
import os
import sys

from .evaluation.defaults import (
    DEFAULT_RESTORATION_CASES,
    EVALUATION_SEED,
    FULL_EVALUATION_IMAGES,
    QUICK_EVALUATION_IMAGES,
    QUICK_RESTORATION_CASES,
    restoration_cases,
)
from .output_folders import check_output_folder, staged_output_folder, staged_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _case(text: str) -> tuple[str, int | float]:
    """`gaussian_noise/s3` (table severity) or `gaussian_noise/sigma0.3` (Gaussian std in [0, 1] units)."""
    from .data.corruptions import canonical_name

    name, _, level = text.partition("/")
    try:
        if level.startswith("sigma") and canonical_name(name) == "gaussian_noise":
            return "gaussian_noise", float(level[5:])
        if level.startswith("s") and 1 <= int(level[1:]) <= 5:
            return canonical_name(name), int(level[1:])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    raise argparse.ArgumentTypeError(f"expected <corruption>/s<1..5> or gaussian_noise/sigma<std>, got {text!r}")


def _add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline folder or Hub id (RobustDDPMPipeline)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generators (one per image: seed + index)")
    parser.add_argument("--batch_size", type=_positive, default=64, help="images per pipeline call")


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-robust` parser: one subcommand per `_add_<command>_command`."""
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="diffusers-robust", description="Robust DDPMs on top of Diffusers.")
    parser.add_argument("--version", action="version", version=f"diffusers-robust {version('diffusers-robust')}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    _add_sample_command(commands)
    _add_restore_command(commands)
    _add_evaluate_command(commands)
    _add_push_command(commands)
    _add_annotate_command(commands)
    _add_imperfect_command(commands)
    _add_presets_command(commands)
    return parser


def _add_train_command(commands) -> None:
    from .training.config import build_argument_parser

    train = commands.add_parser("train", help="train a robust DDPM", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train a robust DDPM. Options come from --config, then the command line; "
                                            "several processes: accelerate launch -m diffusers_robust train ...")
    build_argument_parser(train)


def _add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier result of this package in --output_dir (a folder holding other files is "
                             "always refused)")


def _local(paths: list[str]) -> list[str]:
    """The paths that exist here (a Hub id is not one)."""
    return [path for path in paths if os.path.exists(path)]


def _output_rules(args: argparse.Namespace, inputs: list[str] = ()) -> dict:
    """How a command's `--output_dir` is checked (see `output_folders`), checked once here before any work."""
    rules = {"command": args.command, "overwrite": args.overwrite, "inputs": _local(list(inputs)),
             "keep": _local([args.pipeline])}
    check_output_folder(args.output_dir, **rules)
    return rules


def _add_sample_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    sample = commands.add_parser("sample", help="generate images with a pipeline", formatter_class=defaults,
                                 description="Generate images: a PNG grid and/or one PNG per image.")
    _add_pipeline_arguments(sample)
    sample.add_argument("--output_dir", default="samples", help="where the images go")
    _add_overwrite_argument(sample)
    sample.add_argument("--num_images", type=_positive, default=16, help="images to generate")
    sample.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="DDIM (deterministic) or ancestral DDPM")
    sample.add_argument("--num_inference_steps", type=_positive, default=50, help="denoising steps")
    sample.add_argument("--output", choices=("grid", "images", "both"), default="both",
                        help="grid.png, image-<i>.png per image, or both")


def _add_restore_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    restore = commands.add_parser("restore", help="restore corrupted image files", formatter_class=defaults,
                                  description="Restore image files (or every image in the folders given) with the "
                                              "pipeline's restoration; the restored images keep their file names. With no "
                                              "restoration option, what damaged each image is detected and restored by the "
                                              "matching method; restoration.json records the choice per image.")
    _add_pipeline_arguments(restore)
    restore.add_argument("inputs", nargs="+", help="image files or folders of images, of any sizes (sides of at least "
                                                   "the UNet's downsampling factor); each is restored at its own size")
    restore.add_argument("--output_dir", default="restored", help="where the restored images go")
    _add_overwrite_argument(restore)
    restore.add_argument("--corruption", default=None,
                         help="what damaged the images (gaussian_noise, impulse_noise, gaussian_blur, ..., or auto); with "
                              "no restoration option it is detected per image (auto)")
    restore.add_argument("--severity", type=int, choices=range(1, 6), default=None, help="1..5, the corruption's severity")
    restore.add_argument("--noise_sigma", type=float, default=None, help="Gaussian noise std in [0, 1] image units")
    restore.add_argument("--blur_sigma", type=float, default=None,
                         help="Gaussian blur std in pixels (any tool's blur); --corruption gaussian_blur alone estimates it")
    restore.add_argument("--strength", type=float, default=None, help="SDEdit strength in (0, 1]: fresh noise, then sampling")
    restore.add_argument("--masks", default=None,
                         help="folder of mask images named like the inputs: white where a pixel is missing")
    restore.add_argument("--restoration_steps", type=_positive, default=None, help="denoiser calls per restoration")
    restore.add_argument("--learned_restoration", action="store_true",
                         help="restore with a restoration-trained pipeline's conditioned denoiser")


def _add_evaluate_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    evaluate = commands.add_parser(
        "evaluate", formatter_class=defaults, help="held-out evaluation report of a pipeline",
        description="Restoration (PSNR, SSIM, classifier accuracy), generation (FID/KID, digits figures), memorisation "
                    "and validation losses of a pipeline, on held-out data, into report.json, report.md and PNG plots.",
    )
    evaluate.add_argument("pipeline", help="pipeline folder or Hub id (RobustDDPMPipeline)")
    evaluate.add_argument("--output_dir", default="evaluation", help="where the report goes")
    _add_overwrite_argument(evaluate)
    evaluate.add_argument("--dataset", default="digits", help="'digits', an image folder, parquet/arrow files or a Hub name")
    evaluate.add_argument("--split", default="test", help="held-out split that is scored; a dataset with no 'test' split "
                          "holds out --validation_share of --train_split, as training does")
    evaluate.add_argument("--validation_data", default=None, help="held-out images from elsewhere (folder, files, Hub id)")
    evaluate.add_argument("--validation_share", type=float, default=0.1, help="share held out when there is no split")
    evaluate.add_argument("--validation_holdout_seed", type=int, default=0, help="seed of that hold-out (training's default: 0)")
    evaluate.add_argument("--train_split", default="train", help="train split, for memorisation distances")
    evaluate.add_argument("--full", action="store_true",
                          help=f"today's full depth: {len(DEFAULT_RESTORATION_CASES)} restoration cases on "
                               f"{FULL_EVALUATION_IMAGES} images (default: {len(QUICK_RESTORATION_CASES)} cases on "
                               f"{QUICK_EVALUATION_IMAGES} images, about 2 minutes for 8x8 "
                               "digits on 2 cores; the generation and loss figures are the same)")
    evaluate.add_argument("--num_images", type=_positive, default=argparse.SUPPRESS,
                          help=f"held-out images (default {QUICK_EVALUATION_IMAGES}; --full {FULL_EVALUATION_IMAGES})")
    evaluate.add_argument("--num_samples", type=_positive, default=256, help="generated samples for FID/KID and digits figures")
    evaluate.add_argument("--sampling_steps", type=_positive, default=50, help="DDIM steps per sample")
    evaluate.add_argument("--cases", type=_case, nargs="+", default=argparse.SUPPRESS,
                          help="restoration cases, e.g. gaussian_noise/s3 impulse_noise/s5 gaussian_noise/sigma0.3 "
                               "(default: " + " ".join(f"{c}/s{v}" if isinstance(v, int) else f"{c}/sigma{v:g}"
                                                     for c, v in QUICK_RESTORATION_CASES) + "; --full: all of the table)")
    evaluate.add_argument("--inception_weights", default=None,
                          help="TorchScript Inception-v3 (inception-2015-12-05.pt) for FID/KID; default: offline pixel features")
    evaluate.add_argument("--seed", type=int, default=EVALUATION_SEED, help="evaluation seed (independent of training)")
    evaluate.add_argument("--learned_restoration", action="store_true",
                          help="restore with a restoration-trained pipeline's conditioned denoiser where it can")
    evaluate.add_argument("--device", default="cpu", help="torch device")


def _add_push_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    push = commands.add_parser("push", help="upload a trained pipeline folder to the Hub", formatter_class=defaults,
                               description="Upload the pipeline, model card, metrics, config, sample grid and report of "
                                           "a training output folder (never checkpoints or logs). The token comes from "
                                           "HF_TOKEN or `hf auth login`.")
    push.add_argument("folder", help="training output folder (model_index.json, unet/, scheduler/, ...)")
    push.add_argument("repo_id", help="'user/name' on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")


def _add_annotate_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    annotate = commands.add_parser(
        "annotate", formatter_class=defaults, help="estimate each image's noise std and write the annotation sidecar",
        description="Estimate each training image's Gaussian noise std ([0, 1] units, from its flat regions), write "
                    "them as an annotations.csv sidecar (keyed by file name, else record id) and print a histogram, "
                    "to look at before training with the noisy-data objective.")
    annotate.add_argument("dataset", help="image folder, parquet/arrow files, or 'digits'")
    annotate.add_argument("--split", default="train", help="split to annotate")
    annotate.add_argument("--image_column", default=None, help="image column; detected if omitted")
    annotate.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 (grey) or 3 (RGB)")
    annotate.add_argument("--resolution", type=_positive, default=None, help="side in pixels; default: each image's own")
    annotate.add_argument("--output", default=None, help="sidecar path; default: DATASET/annotations.csv for a folder")
    annotate.add_argument("--overwrite", action="store_true", help="replace an existing sidecar")


def _add_imperfect_command(commands) -> None:
    defaults = argparse.ArgumentDefaultsHelpFormatter
    imperfect = commands.add_parser(
        "make-imperfect", formatter_class=defaults, help="make a seeded imperfect copy of a dataset, with annotations",
        description="Damage a share of a dataset's records (Gaussian noise of a known std, blur or JPEG at a severity) "
                    "and save it twice: float arrays kept unclipped (float/train.parquet) and 8-bit PNG files "
                    "(png/, with annotations.csv), plus recipe.json.")
    imperfect.add_argument("--dataset", default="digits", help="source: 'digits', an image folder or parquet/arrow files")
    imperfect.add_argument("--split", default="train", help="split to copy")
    imperfect.add_argument("--recipe", required=True,
                           help="corruption[:level]=share, comma separated, e.g. gaussian_noise:0.2=0.9,clean=0.1")
    imperfect.add_argument("--channels", type=int, choices=(1, 3), default=None,
                           help="1 (grey) or 3 (RGB); default: the data's own")
    imperfect.add_argument("--resolution", type=_positive, default=None, help="side in pixels; default: the data's own")
    imperfect.add_argument("--seed", type=int, default=0, help="seeds which record gets what and the noise")
    imperfect.add_argument("--output_dir", required=True, help="where float/, png/ and recipe.json go")
    _add_overwrite_argument(imperfect)


def _add_presets_command(commands) -> None:
    commands.add_parser("presets", help="list the named presets that train --pipeline starts from",
                        description="The presets installed with the package (configs, no weights): train --pipeline NAME "
                                    "starts from one from any directory; a folder path or a Hub id works too.")


def run_presets(args: argparse.Namespace) -> list[str]:
    from .pipelines.presets import available_presets, preset_root

    for name, description in available_presets().items():
        print(f"{name:<18} {description}")
    print(f"(in {preset_root()})")
    return []


def run_annotate(args: argparse.Namespace) -> list[str]:
    from .data.annotations import annotate_dataset

    output = args.output or (os.path.join(args.dataset, "annotations.csv") if os.path.isdir(args.dataset) else None)
    if output is None:
        raise ValueError(f"{args.dataset} is not a folder: pass --output for the sidecar")
    if os.path.exists(output) and not args.overwrite:
        raise FileExistsError(f"{output} exists: pass --overwrite to replace it")
    levels = annotate_dataset(args.dataset, output, args.split, args.image_column, args.channels, args.resolution)
    print(levels)
    return [output]


def run_make_imperfect(args: argparse.Namespace) -> list[str]:
    import torch
    from torch.utils.data import DataLoader

    from .data.datasets import collate_image_batch, load_image_dataset
    from .data.imperfect import make_imperfect, parse_recipe, png_names, save_imperfect

    recipe = parse_recipe(args.recipe)
    check_output_folder(args.output_dir, "make-imperfect", args.overwrite, _local([args.dataset]))
    channels, resolution = args.channels, args.resolution
    if channels is None or resolution is None:  # the data's own: nothing is converted unless asked for
        stored = load_image_dataset(args.dataset, args.split, channels=1, resolution=8, annotations="ignore").source_shape
        if stored is None:
            raise ValueError(f"{args.dataset}: no image of split '{args.split}' decodes")
        if resolution is None and stored[1] != stored[2]:
            raise ValueError(f"{args.dataset} holds {stored[2]}x{stored[1]} images; make-imperfect writes square ones: "
                             "pass --resolution")
        channels, resolution = channels or stored[0], resolution or stored[1]
    loaded = load_image_dataset(args.dataset, args.split, channels=channels, resolution=resolution,
                                annotations="ignore")
    batches = list(DataLoader(loaded.dataset, batch_size=256, collate_fn=collate_image_batch))
    images = torch.cat([batch["pixel_values"] for batch in batches])
    records = [record for batch in batches for record in batch["record_ids"]]
    # An image folder's files keep their names (as .png); records without a file of their own are numbered.
    names = png_names(records, args.dataset) if all(os.path.isfile(record) for record in records) else None
    paths = save_imperfect(make_imperfect(images, recipe, args.seed), args.output_dir, recipe, args.seed,
                           overwrite=args.overwrite, inputs=_local([args.dataset]), names=names)
    return [paths["float"], paths["png"]]


def _load_pipeline(args: argparse.Namespace):
    from .pipelines.pipeline_robust_ddpm import RobustDDPMPipeline

    device = checked_device(args.device)  # before the load: a wrong device is one line, not a traceback
    check_pipeline_source(args.pipeline)
    pipeline = RobustDDPMPipeline.from_pretrained(args.pipeline).to(device)
    pipeline.set_progress_bar_config(disable=True)
    if getattr(args, "batch_size", None) is not None:  # refused before a batch is allocated, naming the estimate
        from .models import check_activation_memory, image_size

        check_activation_memory(pipeline.unet.config, args.batch_size, max(image_size(pipeline.unet.config.sample_size)),
                                device, f"--batch_size {args.batch_size}", training=False)
    return pipeline


def check_pipeline_source(source: str) -> None:
    """A pipeline is a local folder or a Hub id `owner/name`: anything else is named at once (a typo such as
    `my_modle` must not become minutes of retries against the Hub); a folder must hold `model_index.json`."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "model_index.json")):
            raise FileNotFoundError(f"{source} is not a pipeline folder: it has no model_index.json")
        return
    parts = source.split("/")
    if os.path.exists(source) or len(parts) != 2 or not all(parts) or source.startswith((".", "~")):
        raise FileNotFoundError(f"pipeline {source!r} is no folder here and no Hub id (owner/name): check the path")


def checked_device(name: str):
    """`torch.device(name)`, or `ValueError` saying why this machine cannot use it (no CUDA, no such index, no MPS)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _generators(seed: int, start: int, count: int) -> list:
    import torch

    return [torch.Generator().manual_seed(seed + start + i) for i in range(count)]


def run_sample(args: argparse.Namespace) -> list[str]:
    from tqdm.auto import tqdm

    from .evaluation.images import make_grid
    from .schedulers import RobustDDIMScheduler, RobustDDPMScheduler

    rules = _output_rules(args)
    pipeline = _load_pipeline(args)
    scheduler_class = RobustDDIMScheduler if args.sampler == "ddim" else RobustDDPMScheduler
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    written, images = [], []
    with staged_output_folder(args.output_dir, **rules) as staging:
        for start in tqdm(range(0, args.num_images, args.batch_size), desc="sample"):
            count = min(args.batch_size, args.num_images - start)
            batch = pipeline(batch_size=count, generator=_generators(args.seed, start, count),
                             num_inference_steps=args.num_inference_steps, output_type="np").images
            images.extend(batch)
            if args.output in ("images", "both"):
                for index, picture in enumerate(pipeline.numpy_to_pil(batch)):
                    written.append(os.path.join(staging, f"image-{start + index:05d}.png"))
                    picture.save(written[-1])
        if args.output in ("grid", "both"):
            import numpy as np

            written.append(os.path.join(staging, "grid.png"))
            make_grid(np.stack(images), gap=2).save(written[-1])  # grey gaps between the samples
    return [staged_path(staging, args.output_dir, path) for path in written]


def _image_files(inputs: list[str]) -> list[str]:
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item) if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise ValueError(f"{item} holds no image file ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item} is neither an image file nor a folder")
    targets = [restored_name(path) for path in files]
    clashes = sorted({target for target in targets if targets.count(target) > 1})
    if clashes:
        named = {target: [path for path in files if restored_name(path) == target] for target in clashes}
        raise ValueError("several inputs would be restored to one file: " + "; ".join(
            f"{', '.join(paths)} -> {target}" for target, paths in named.items()))
    return files


def restored_name(path: str) -> str:
    """The file an input image is restored to: its name with a `.png` suffix."""
    return os.path.splitext(os.path.basename(path))[0] + ".png"


def _read_image(path: str, channels: int, what: str, size: tuple[int, int] | None = None):
    """One decoded image `(H, W, C)` in `[0, 1]`; `ValueError` naming the file when it is broken, or not of `size`
    `(H, W)` when that is given (a mask must fit its image: restoration must not resample the damage)."""
    import numpy as np

    from .data.datasets import decode_image, to_mode

    try:
        image = to_mode(decode_image(path), channels)
    except Exception as error:  # noqa: BLE001 - any decoding failure names the file
        raise ValueError(f"cannot read {what} {path}: {error}") from None
    if size is not None and image.size != (size[1], size[0]):  # PIL's size is (width, height)
        raise ValueError(f"{what} {path} is {image.size[0]}x{image.size[1]} pixels where its image is "
                         f"{size[1]}x{size[0]}: a mask must have its image's size")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array


def _batches_of_one_size(images: list, batch_size: int) -> list[list[int]]:
    """Indices of `images` in batches of at most `batch_size`, each of one size, in file order within a size."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(index)
    return [group[start:start + batch_size] for group in groups.values() for start in range(0, len(group), batch_size)]


def run_restore(args: argparse.Namespace) -> list[str]:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .pipelines.restoration import plan_restoration

    # Bad option combinations fail before any file is read (`mask` only needs to be present or absent here).
    plan_restoration(corruption=args.corruption, severity=args.severity, noise_sigma=args.noise_sigma,
                     strength=args.strength, mask=args.masks, blur_sigma=args.blur_sigma)
    files = _image_files(args.inputs)
    rules = _output_rules(args, [*args.inputs, *([args.masks] if args.masks else [])])
    pipeline = _load_pipeline(args)
    images = [_read_image(path, pipeline.image_channels, "input") for path in files]
    masks = None
    if args.masks is not None:
        masks = [(_read_image(os.path.join(args.masks, os.path.basename(path)), 1, "mask", image.shape[:2]) > 0.5)
                 .astype(np.float32) for path, image in zip(files, images, strict=True)]
    detect = all(value is None for value in (args.corruption, args.severity, args.noise_sigma, args.strength, args.masks,
                                             args.blur_sigma))
    options = {"corruption": "auto" if detect else args.corruption, "severity": args.severity,
               "noise_sigma": args.noise_sigma, "strength": args.strength, "restoration_steps": args.restoration_steps,
               "learned_restoration": args.learned_restoration, "blur_sigma": args.blur_sigma}
    with staged_output_folder(args.output_dir, **rules) as staging, tqdm(total=len(files), desc="restore") as progress:
        written, choices = [], {}
        for batch in _batches_of_one_size(images, args.batch_size):  # images of several sizes: one size per call
            mask = None if masks is None else np.stack([masks[index] for index in batch])
            generators = [torch.Generator().manual_seed(args.seed + index) for index in batch]
            output = pipeline(image=np.stack([images[index] for index in batch]), mask=mask, generator=generators,
                              output_type="pil", **options)
            for position, (index, picture) in enumerate(zip(batch, output.images, strict=True)):
                name = restored_name(files[index])
                written.append(os.path.join(staging, name))
                picture.save(written[-1])
                choices[name] = (output.detections[position].to_dict() if output.detections is not None
                                 else {key: value for key, value in options.items() if value is not None})
            progress.update(len(batch))
        for name, choice in choices.items():
            print(f"{name}: {_describe_choice(choice)}", file=sys.stderr)
        written.append(os.path.join(staging, "restoration.json"))
        with open(written[-1], "w", encoding="utf-8") as handle:
            json.dump({"detected": detect, "images": choices}, handle, indent=2)
    return [staged_path(staging, args.output_dir, path) for path in written]


def _describe_choice(choice: dict) -> str:
    """One line for a restored image: what was detected (or asked for) and how it was restored."""
    if "method" not in choice:
        return "restored with " + ", ".join(f"{key}={value}" for key, value in choice.items())
    if choice["corruption"] is None:
        return "clean: kept as it is"
    level = (f", noise std {choice['noise_sigma']:.3f}" if choice["noise_sigma"] is not None
             else f", severity {choice['severity']}" if choice["severity"] is not None else "")
    return f"{choice['corruption']}{level}: restored by {choice['method']}"


def evaluation_depth(args: argparse.Namespace) -> tuple[list[tuple[str, int | float]], int]:
    """The restoration cases and held-out image count `evaluate` scores: `--cases` / `--num_images` when given, else the
    quick default (`QUICK_RESTORATION_CASES` on `QUICK_EVALUATION_IMAGES`) or, with `--full`, every case of the table on
    `FULL_EVALUATION_IMAGES`."""
    cases = getattr(args, "cases", None) or list(restoration_cases(args.full))
    return cases, getattr(args, "num_images", None) or (FULL_EVALUATION_IMAGES if args.full else QUICK_EVALUATION_IMAGES)


def run_evaluate(args: argparse.Namespace) -> list[str]:
    from .data.splits import plan_held_out
    from .evaluation.report import evaluate_pipeline, write_report

    plan = plan_held_out(args.dataset, args.train_split, args.split, args.validation_data, args.validation_share,
                         args.validation_holdout_seed)
    print(plan.description, file=sys.stderr)
    rules = _output_rules(args)
    pipeline = _load_pipeline(args)
    cases, num_images = evaluation_depth(args)
    report = evaluate_pipeline(pipeline, plan.source, plan.split, args.train_split, num_images, args.num_samples,
                               args.sampling_steps, cases, args.inception_weights, args.seed,
                               learned_restoration=args.learned_restoration, hold_out=plan.hold_out,
                               train_dataset=args.dataset)
    with staged_output_folder(args.output_dir, **rules) as staging:
        written = write_report(report, staging, title=f"Evaluation of {args.pipeline}").values()
    return [staged_path(staging, args.output_dir, path) for path in written]


def run_push(args: argparse.Namespace) -> list[str]:
    from .hub import push_pipeline_to_hub, write_model_card

    if not os.path.isfile(os.path.join(args.folder, "model_index.json")):
        raise FileNotFoundError(f"{args.folder} holds no model_index.json: not a saved pipeline")
    config_path = os.path.join(args.folder, "training_config.yaml")
    if os.path.isfile(config_path) and os.path.isfile(os.path.join(args.folder, "metrics.json")):
        import yaml  # the card is written again from the run's own record, so it names this repository

        from .training.summary import RunSummary

        with open(config_path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        write_model_card(args.folder, args.repo_id, config, RunSummary.load(args.folder), config.get("license", "apache-2.0"))
    elif not os.path.isfile(os.path.join(args.folder, "README.md")):
        raise FileNotFoundError(f"{args.folder} has no README.md model card, and no metrics.json and "
                                "training_config.yaml to write one from")
    return [push_pipeline_to_hub(args.folder, args.repo_id, private=args.private)]


# OSErrors that are a failure of the machine, not of the input: a full disk or quota, an I/O error, a read-only file system.
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":  # the training entry point parses its own options (and runs under accelerate)
        from .training.config import parse_training_config
        from .training.loop import run_training

        try:
            config = parse_training_config(argv[1:])
        except (ValueError, FileNotFoundError) as error:
            print(f"diffusers-robust train: error: {error}".splitlines()[0], file=sys.stderr)
            return 2
        run_training(config)
        return 0
    commands = {"sample": run_sample, "restore": run_restore, "evaluate": run_evaluate, "push": run_push,
                "annotate": run_annotate, "make-imperfect": run_make_imperfect, "presets": run_presets}
    try:
        written = commands[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: output folders are staged, so the earlier result (or nothing) is in place
        where = f"; {args.output_dir} is as it was" if getattr(args, "output_dir", None) else ""
        print(f"diffusers-robust {args.command}: interrupted{where}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # one line either way; the exit code says whose fault it is
        machine = isinstance(error, OSError) and error.errno in MACHINE_ERRNOS
        print(f"diffusers-robust {args.command}: {'failed' if machine else 'error'}: {error}".splitlines()[0], file=sys.stderr)
        return 1 if machine else 2  # 2: the input or the command line is wrong (a missing or corrupt file, a bad option)
    shown = written if len(written) <= 5 else [*written[:2], f"... ({len(written) - 4} more)", *written[-2:]]
    if written:
        print(f"wrote {', '.join(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
