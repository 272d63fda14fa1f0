"""The pipeline, its restoration methods, and presets."""
