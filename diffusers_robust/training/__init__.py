"""Training: the config, the objective, set-up, the loop phases, checkpoints, the run summary."""
