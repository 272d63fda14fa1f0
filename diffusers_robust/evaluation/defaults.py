"""Defaults of the evaluation that the command line shows in `--help` (kept free of heavy imports)."""

# The evaluation's seed: independent of any training seed.
EVALUATION_SEED = 1234

# Restoration cases of the evaluation: (corruption, severity) from the table, or ("gaussian_noise", sigma) with a float
# sigma in [0, 1] units for noise beyond the table's (whose severities barely touch 8x8 digits).
DEFAULT_RESTORATION_CASES: tuple[tuple[str, int | float], ...] = (
    *(("gaussian_noise", s) for s in (1, 3, 5)), *(("gaussian_noise", sigma) for sigma in (0.2, 0.3, 0.5)),
    *(("impulse_noise", s) for s in (1, 3, 5)), *(("masking", s) for s in (1, 3, 5)),
    *(("gaussian_blur", s) for s in (1, 3, 5)),
    *((name, 3) for name in ("shot_noise", "speckle_noise", "jpeg_compression", "contrast", "brightness", "pixelate")),
)

# What `diffusers-robust evaluate` scores unless `--full`: one case per method and the noise levels that matter (the
# main job's cases), so the report takes about 2 minutes on 8x8 digits with 2 cores.
QUICK_RESTORATION_CASES: tuple[tuple[str, int | float], ...] = (
    ("gaussian_noise", 1), ("gaussian_noise", 3), ("gaussian_noise", 5), ("gaussian_noise", 0.3), ("impulse_noise", 3),
    ("masking", 3), ("gaussian_blur", 3), ("jpeg_compression", 3),
)


def restoration_cases(full: bool) -> tuple[tuple[str, int | float], ...]:
    """The report's restoration cases: every case of the table with `full` (`evaluate --full`, `report_full`), else the
    quick ones (`evaluate`'s default)."""
    return DEFAULT_RESTORATION_CASES if full else QUICK_RESTORATION_CASES


# Held-out images the restoration cases are scored on: by default, and with `--full`.
QUICK_EVALUATION_IMAGES = 200
FULL_EVALUATION_IMAGES = 300
