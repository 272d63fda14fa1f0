"""Throughput of the data pipeline: digits at 32x32, EDM-like augmentation, RandomCorruption.

Usage: python benchmarks/bench_data.py [--images 4096] [--batch-size 64]
Prints a markdown table of images per second, map-style and streaming, with 0, 1 and 2 DataLoader workers.
"""

import argparse
import os
import platform
import time

import torch
from torch.utils.data import DataLoader

from diffusers_robust.data.corruptions import RandomCorruption
from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset

RECIPE = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "augment", "edm.yaml")


def measure(streaming: bool, workers: int, images: int, batch_size: int) -> float:
    loaded = load_image_dataset("digits", split="all", streaming=streaming, channels=1, resolution=32, augment=RECIPE,
                                num_shards=8, seed=0)
    corrupt = RandomCorruption(["gaussian_noise", "impulse_noise", "gaussian_blur", "jpeg_compression"], (1, 5), p=0.5)
    generator = torch.Generator().manual_seed(0)
    seen, epoch = 0, 0
    start = time.perf_counter()
    while seen < images:
        loaded.set_epoch(epoch)
        loader = DataLoader(loaded.dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_image_batch)
        for batch in loader:
            corrupt(batch["pixel_values"], generator=generator)
            seen += len(batch["pixel_values"])
            if seen >= images:
                break
        epoch += 1
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| mode | workers | images/s |\n|---|---|---|")
    for streaming in (False, True):
        for workers in (0, 1, 2):
            rate = measure(streaming, workers, args.images, args.batch_size)
            print(f"| {'streaming' if streaming else 'map-style'} | {workers} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
