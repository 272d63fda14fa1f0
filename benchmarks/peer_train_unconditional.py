"""The peer, as a whole process: the training loop of Diffusers' `examples/unconditional_image_generation/
train_unconditional.py` (v0.42.1), written out because the example is not on PyPI, on a preset's UNet and the digits.

    python benchmarks/peer_train_unconditional.py --preset pipelines/ddpm-digits --max_train_steps 200 --output_dir out

What it keeps from the example: Accelerate (`prepare` of model, optimizer, data loader and LR scheduler), AdamW with the
example's defaults, the cosine schedule with 500 warm-up steps, `DDPMScheduler.add_noise` and an epsilon MSE, clipping at
1.0, `EMAModel` (0.9999, inv_gamma 1, power 3/4), and at the end a `DDPMPipeline` saved with the EMA weights. What it
leaves out: the periodic image generation (1000 DDPM steps every 10 epochs) and checkpoints, which ours does not do at
these settings either. Images are the same embedded digits as ours, through `datasets`, resized as the example
does; it imports nothing of diffusers-robust.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel


def digits_train_split():
    """The same images as our `digits` train split (every image but each sixth of scikit-learn's digits, 8-bit grey), as
    a `datasets.Dataset` with an `image` column; built here so that the peer imports nothing of ours."""
    import datasets
    import PIL.Image
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
    images = [PIL.Image.fromarray(pixels[i], mode="L") for i in range(len(pixels)) if i % 6 != 0]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def train_dataloader_of(dataset, channels: int, resolution: int, batch_size: int):
    """The example's data pipeline: Resize, (Center|Random)Crop, ToTensor, Normalize([0.5], [0.5]); shuffled batches."""

    def transform_images(examples):
        images = []
        for image in examples["image"]:
            image = image.convert("RGB" if channels == 3 else "L").resize((resolution, resolution))
            array = np.asarray(image, dtype=np.float32) / 255.0
            array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
            images.append(torch.from_numpy((array - 0.5) / 0.5))
        return {"input": images}

    dataset.set_transform(transform_images)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)


def train(accelerator, model, noise_scheduler, optimizer, lr_scheduler, ema_model, train_dataloader, num_epochs: int,
          max_train_steps: int) -> tuple[int, float | None]:
    """The example's epoch loop; returns `(optimizer steps, time.time() at the end of the first)`."""
    global_step, first_step_at = 0, None
    for _ in range(num_epochs):
        model.train()
        for batch in train_dataloader:
            clean_images = batch["input"]
            noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                      device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema_model.step(model.parameters())
                global_step += 1
                first_step_at = first_step_at or time.time()
            if global_step >= max_train_steps:
                return global_step, first_step_at
    return global_step, first_step_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pipelines/ddpm-digits")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    args = parser.parse_args()

    accelerator = Accelerator()
    unet_config = UNet2DModel.load_config(os.path.join(args.preset, "unet"))
    model = UNet2DModel.from_config(unet_config)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.95, 0.999), weight_decay=1e-6,
                                  eps=1e-08)
    ema_model = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                         model_cls=UNet2DModel, model_config=model.config)
    train_dataloader = train_dataloader_of(digits_train_split(), unet_config["in_channels"], unet_config["sample_size"],
                                           args.train_batch_size)
    num_epochs = math.ceil(args.max_train_steps / len(train_dataloader))
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                 num_training_steps=len(train_dataloader) * num_epochs)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    ema_model.to(accelerator.device)
    global_step, first_step_at = train(accelerator, model, noise_scheduler, optimizer, lr_scheduler, ema_model,
                                       train_dataloader, num_epochs, args.max_train_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        ema_model.store(unet.parameters())
        ema_model.copy_to(unet.parameters())
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(args.output_dir)
        ema_model.restore(unet.parameters())
        with open(os.path.join(args.output_dir, "timing.json"), "w") as handle:
            json.dump({"first_step_at": first_step_at, "steps": global_step}, handle)
    accelerator.end_training()


if __name__ == "__main__":
    main()
