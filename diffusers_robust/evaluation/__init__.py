"""Evaluation: validation losses, metrics, restoration scores, the held-out report, image grids."""
