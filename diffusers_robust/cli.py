"""`diffusers-robust` command line (also `python -m diffusers_robust`). Subcommands:

- `evaluate PIPELINE`: the held-out evaluation report (restoration, generation, memorisation, losses) of a pipeline
  folder or Hub id, written as `report.json`, `report.md` and PNG plots.

Bad input exits with code 2 and a one-line message.
"""

import argparse
import sys

from .evaluation import DEFAULT_RESTORATION_CASES, EVALUATION_SEED


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _case(text: str) -> tuple[str, int | float]:
    """`gaussian_noise/s3` (table severity) or `gaussian_noise/sigma0.3` (Gaussian std in [0, 1] units)."""
    from .corruptions import canonical_name

    name, _, level = text.partition("/")
    try:
        if level.startswith("sigma") and canonical_name(name) == "gaussian_noise":
            return "gaussian_noise", float(level[5:])
        if level.startswith("s") and 1 <= int(level[1:]) <= 5:
            return canonical_name(name), int(level[1:])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    raise argparse.ArgumentTypeError(f"expected <corruption>/s<1..5> or gaussian_noise/sigma<std>, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-robust", description="Robust DDPMs on top of Diffusers.")
    commands = parser.add_subparsers(dest="command", required=True)
    evaluate = commands.add_parser(
        "evaluate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="held-out evaluation report of a pipeline",
        description="Restoration (PSNR, SSIM, classifier accuracy), generation (FID/KID, digits figures), memorisation "
                    "and validation losses of a pipeline, on held-out data, into report.json, report.md and PNG plots.",
    )
    evaluate.add_argument("pipeline", help="pipeline folder or Hub id (RobustDDPMPipeline)")
    evaluate.add_argument("--output_dir", default="evaluation", help="where the report goes")
    evaluate.add_argument("--dataset", default="digits", help="'digits', an image folder, parquet/arrow files or a Hub name")
    evaluate.add_argument("--split", default="test", help="held-out split that is scored")
    evaluate.add_argument("--train_split", default="train", help="train split, for memorisation distances")
    evaluate.add_argument("--num_images", type=_positive, default=300, help="held-out images")
    evaluate.add_argument("--num_samples", type=_positive, default=256, help="generated samples for FID/KID and digits figures")
    evaluate.add_argument("--sampling_steps", type=_positive, default=50, help="DDIM steps per sample")
    evaluate.add_argument("--cases", type=_case, nargs="+", default=list(DEFAULT_RESTORATION_CASES),
                          help="restoration cases, e.g. gaussian_noise/s3 impulse_noise/s5 gaussian_noise/sigma0.3")
    evaluate.add_argument("--inception_weights", default=None,
                          help="TorchScript Inception-v3 (inception-2015-12-05.pt) for FID/KID; default: offline pixel features")
    evaluate.add_argument("--seed", type=int, default=EVALUATION_SEED, help="evaluation seed (independent of training)")
    evaluate.add_argument("--learned_restoration", action="store_true",
                          help="restore with a restoration-trained pipeline's conditioned denoiser where it can")
    evaluate.add_argument("--device", default="cpu", help="torch device")
    return parser


def run_evaluate(args: argparse.Namespace) -> None:
    import torch

    from .pipeline_robust_ddpm import RobustDDPMPipeline
    from .report import evaluate_pipeline, write_report

    pipeline = RobustDDPMPipeline.from_pretrained(args.pipeline).to(torch.device(args.device))
    pipeline.set_progress_bar_config(disable=True)
    report = evaluate_pipeline(pipeline, args.dataset, args.split, args.train_split, args.num_images, args.num_samples,
                               args.sampling_steps, args.cases, args.inception_weights, args.seed,
                               learned_restoration=args.learned_restoration)
    paths = write_report(report, args.output_dir, title=f"Evaluation of {args.pipeline}")
    print(f"wrote {', '.join(paths.values())}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            run_evaluate(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"diffusers-robust {args.command}: error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
