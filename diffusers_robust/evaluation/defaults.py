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
