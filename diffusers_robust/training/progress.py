"""Training progress a person can read: a bar on a terminal, one log line every few seconds in a log file."""

import logging
import math
import sys
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Seconds between progress lines when the output is not a terminal (a log file, a cluster job's output).
LOG_INTERVAL_SECONDS = 30.0


def format_duration(seconds: float) -> str:
    """`1h02m`, `4m05s` or `12s`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class StepProgress:
    """
    Progress of the optimizer steps. On a terminal: a tqdm bar with the loss and images/s. Elsewhere (stderr is not a
    TTY): one line every `interval` seconds and at the end, `step 120/1200 (10%) | 4.1 steps/s | 33 images/s | loss
    0.0512 (mean since the last line 0.0601) | ETA 4m23s`, instead of a bar redrawn at every step.

    Args:
        total (`int`): the run's last step; `initial` the step it starts from (a resumed run).
        enabled (`bool`): False on every process but the local main one.
        interactive (`bool`, *optional*): force the bar (True) or the lines (False); default: whether stderr is a TTY.
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, interactive: bool | None = None,
                 interval: float = LOG_INTERVAL_SECONDS):
        self.total, self.step, self.enabled, self.interval = total, initial, enabled, interval
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=total, initial=initial, desc="steps") if enabled and self.interactive else None
        self.started = self.last_line = time.perf_counter()
        self.first_step = initial
        self.losses_since_line: list[float] = []

    def update(self, step: int, loss: float, images_per_second: float) -> None:
        self.step = step
        self.losses_since_line.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")
        elif self.enabled and (time.perf_counter() - self.last_line >= self.interval or step == self.total):
            self.log_line(loss, images_per_second)

    def log_line(self, loss: float, images_per_second: float) -> str:
        now = time.perf_counter()
        steps_per_second = (self.step - self.first_step) / max(now - self.started, 1e-9)
        eta = (self.total - self.step) / steps_per_second if steps_per_second > 0 else math.inf
        mean = sum(self.losses_since_line) / len(self.losses_since_line)
        line = (f"step {self.step}/{self.total} ({self.step / max(self.total, 1):.0%}) | {steps_per_second:.2f} steps/s | "
                f"{images_per_second:.0f} images/s | loss {loss:.4f} (mean since the last line {mean:.4f}) | "
                f"ETA {format_duration(eta)}")
        logger.info(line)
        self.last_line, self.losses_since_line = now, []
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# Loggers whose INFO lines repeat what this package logs (six lines per checkpoint from Accelerate) or are HTTP chatter.
QUIETED_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator", "httpx", "httpcore", "urllib3", "filelock")


def quiet_third_party_logs() -> None:
    """Keep third-party INFO lines out of the training log (their warnings still show), and Datasets' progress bars
    out of log files (kept on a terminal)."""
    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
