"""Images in: datasets (local folders, `load_dataset`, streaming), corruptions, Albumentations augmentation."""
