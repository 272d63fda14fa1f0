"""The run summary: what a training run did and measured, written to `metrics.json` and read by the model card."""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUMMARY_FILE = "metrics.json"


# Steps kept per history in `metrics.json`.
HISTORY_POINTS = 500
# Fields left out of `metrics.json` when None (what a run without them never had).
OPTIONAL = ("sample_quality", "report", "annotations", "held_out", "monitor_history", "best")


def thin_history(history: dict[int, float], points: int) -> dict[int, float]:
    """At most `points` entries of `history`, evenly spaced over its steps, the first and last kept."""
    steps = sorted(history)
    if len(steps) <= points:
        return dict(history)
    kept = {steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)}
    return {step: history[step] for step in steps if step in kept}


@dataclass
class RunSummary:
    """Facts of one training run. JSON keys are the field names; `from_dict` (and `load`) refuse unknown keys.

    Steps count optimizer updates; images count training images seen over all processes; losses are mean squared errors
    of the model's prediction; histories map an optimizer step to a value.
    """

    global_step: int  # optimizer steps done
    images_seen: int  # training images over all processes
    images_seen_per_rank: list[int]
    num_processes: int
    train_batch_size_effective: int  # images per process per micro-batch, after capping at the dataset size
    mixed_precision: str  # no, fp16 or bf16 (what Accelerate used)
    resolution: int  # training resolution in pixels
    skipped_records: int  # undecodable records skipped
    skipped_record_ids: list[str]
    records_decoded_this_run: int | None  # records read by this process (None with DataLoader workers)
    parameter_checksums_per_rank: list[float] | None  # equal when every rank holds the same weights; None with 1 process
    lr_history: dict[int, float]
    loss_history: dict[int, float]
    validation_losses: dict[str, float]  # at the last step: clean, <corruption>/s<k>, restore/<corruption>/s<k>
    validation_history: dict[int, dict[str, float]]
    validation_images: int  # held-out images of the validation loss
    scheduler_robust_options: dict[str, Any]  # prediction_type and every robust scheduler option, as saved
    training_wall_time_seconds: float
    seconds_to_first_step: float | None = None  # start-up: process start to the end of this run's first optimizer step
    sample_quality: dict[str, Any] | None = None  # labelled embedded data: samples scored by its classifier (`scorer`)
    report: dict[str, Any] | None = field(default=None)  # the held-out report (diffusers-robust evaluate), if written
    annotations: dict[str, Any] | None = None  # imperfect data: counts of clean / noisy / restricted records, trusted level
    held_out: dict[str, Any] | None = None  # where the held-out images came from: source, split, held-out share and seed
    # per validation step: train_loss, generalisation_gap, memorisation_share, memorisation_distance_ratio
    # (`training.monitor.monitor_figures`); None without held-out images
    monitor_history: dict[int, dict[str, float]] | None = None
    best: dict[str, Any] | None = None  # keep_best: the step and held-out clean loss of the pipeline in output_dir/best

    def to_dict(self) -> dict[str, Any]:
        """The JSON form. `lr_history` and `loss_history` keep at most `HISTORY_POINTS` evenly spaced steps (the last
        included), so `metrics.json` stays small on long runs; TensorBoard logs keep every step."""
        values = {key: value for key, value in dataclasses.asdict(self).items() if value is not None or key not in OPTIONAL}
        for key in ("lr_history", "loss_history"):
            values[key] = thin_history(values[key], HISTORY_POINTS)
        return values

    def save(self, output_dir: str) -> str:
        """Write `output_dir/metrics.json`; returns its path."""
        path = os.path.join(output_dir, SUMMARY_FILE)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
        return path

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunSummary":
        names = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - {"digits_quality"})
        if unknown:
            raise ValueError(f"{SUMMARY_FILE}: unknown key(s) {unknown}")
        values = dict(values)
        if "digits_quality" in values:  # its name in 0.1.0's metrics.json
            values["sample_quality"] = {"scorer": "a classifier trained on the real digits", **values.pop("digits_quality")}
        for key in ("lr_history", "loss_history", "validation_history", "monitor_history"):  # JSON keys are strings
            if key in values or key != "monitor_history":
                values[key] = {int(step): value for step, value in values.get(key, {}).items()}
        return cls(**values)

    @classmethod
    def load(cls, output_dir: str) -> "RunSummary":
        with open(os.path.join(output_dir, SUMMARY_FILE), encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))
