#!/usr/bin/env python
"""Train a robust unconditional DDPM with Accelerate.

    accelerate launch training/train_robust_ddpm.py --config training/configs/digits.yaml [--option value ...]

The same entry point is `diffusers-robust train`. Every option is listed by `--help` and documented in the README. The
run's phases (set-up, resume, the step loop, checkpoints, validation, export) live in `diffusers_robust.training.loop`.
"""

from diffusers_robust.training.loop import main

if __name__ == "__main__":
    main()
