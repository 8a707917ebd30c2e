"""Logs of ``clap_fast.train``: text log, ``results.jsonl``, tensorboard / wandb, throughput.

* ``setup_logging``: ``out.log`` (rank 0) / ``out_rank<r>.log`` in the run directory, stderr.
* ``Reporter``: scalars to tensorboard / wandb and records to ``results.jsonl``, on rank 0:
  train scalars, eval metrics, and per epoch the skipped samples summed over ranks.
* ``Throughput``: loss, samples/s, audio seconds/s, data-wait fraction, TFLOP/s per rank and
  MFU over the steps since the last report, plus the epoch's mean loss and data wait.
* ``format_table``: the final metrics as printed by ``python -m clap_fast.train``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clap_fast.data import SkipStats
from clap_fast.model import CLAP
from clap_fast.train.dist import Dist, all_gather_object, barrier
from clap_fast.train.evaluate import eval_template, forward
from clap_fast.train.params import TrainConfig

__all__ = [
    "open_run",
    "setup_logging",
    "Reporter",
    "Throughput",
    "flops_per_sample",
    "peak_flops",
    "format_table",
]

log = logging.getLogger("clap_fast.train")

# Dense bf16 peak FLOP/s by GPU name fragment, for the MFU estimate (override: CLAP_FAST_PEAK_FLOPS).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12}


def open_run(cfg: TrainConfig, d: Dist) -> Path:
    """The run directory (``<logs>/<name>``, with ``checkpoints/``), its logs and ``params.json``."""
    if cfg.name is None:
        cfg.name = f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-model_{cfg.model}-lr_{cfg.lr}-b_{cfg.batch_size}-j_{cfg.workers}-p_{cfg.precision}"
    run_dir = Path(cfg.logs) / cfg.name
    if d.main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier(d)
    setup_logging(run_dir, d)
    if d.main:
        (run_dir / "params.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return run_dir


def setup_logging(run_dir: Path, d: Dist) -> None:
    """Log records to stderr (warnings only off rank 0) and ``out.log`` / ``out_rank<r>.log``."""
    fmt = logging.Formatter(f"%(asctime)s [rank{d.rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h.setLevel(logging.INFO if d.main else logging.WARNING)
        root.addHandler(h)
    fh = logging.FileHandler(run_dir / ("out.log" if d.main else f"out_rank{d.rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)


class Reporter:
    """tensorboard / wandb / results.jsonl on rank 0."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist) -> None:
        self.d, self.run_dir, self.tb, self.wandb = d, run_dir, None, None
        targets = [t for t in cfg.report_to.split(",") if t]
        if not d.main:
            return
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit(
                    "--report-to wandb: the wandb package is not installed (pip install wandb; "
                    "set WANDB_MODE=offline or --wandb-offline to log without a network)"
                ) from exc
            mode = "offline" if cfg.wandb_offline else None
            self.wandb = wandb.init(
                project="clap_fast", name=run_dir.name, notes=cfg.wandb_notes, dir=str(run_dir),
                config=cfg.to_dict(), mode=mode, resume="allow",
            )  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.d.main:
            return
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def record(self, entry: dict[str, Any]) -> None:
        if self.d.main:
            with open(self.run_dir / "results.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def eval(self, metrics: dict[str, float], epoch: int, step: int) -> None:
        """An evaluation's metrics: the text log, ``results.jsonl`` and ``val/*`` scalars."""
        if self.d.main:
            rounded = {k: round(v, 4) for k, v in metrics.items()}
            log.info("eval epoch %d: %s", epoch, json.dumps(rounded))
            self.record({"epoch": epoch, "step": step, "kind": "eval", **metrics})
            self.scalars({f"val/{k}": v for k, v in metrics.items()}, step)

    def epoch_end(
        self, stats: SkipStats, meter: Throughput, epoch: int, stopped: bool = False
    ) -> dict[str, Any]:
        """The epoch's data report: skips summed over ranks (recorded), loader speed per rank.
        ``stopped``: --max-steps ended the epoch early; the counts cover what was read so far."""
        d, total = self.d, SkipStats()
        for s in all_gather_object(stats.to_dict(), d):
            total.merge(s)
        loss = meter.epoch_loss / max(1, meter.epoch_steps)
        entry = {"epoch": epoch, "kind": "data", "train_loss": loss, "skipped": dict(total.counts),
                 "clips": total.clips, "skipped_items": [list(x) for x in total.details]}  # fmt: skip
        if stopped:
            entry["stopped_at_max_steps"] = True
        if d.main:
            if total.counts:
                log.warning("epoch %d: skipped %s", epoch, dict(total.counts))
                for reason, shard, member in total.details:
                    log.warning("  skipped (%s) %s :: %s", reason, shard, member)
            else:
                log.info("epoch %d: no bad samples", epoch)
            if stopped:
                log.info("epoch %d: stopped at --max-steps; the rest of the epoch was not read "
                         "(its samples are neither decoded nor counted)", epoch)  # fmt: skip
            self.record(entry)
        epoch_s = time.perf_counter() - meter.epoch_t
        if stats.busy_s > 0:
            log.info("epoch %d: %d clips decoded on this rank, loader %.1f clips/s per worker, data wait %.0f%% of %.1f s",
                     epoch, stats.clips, stats.clips / stats.busy_s, 100 * meter.epoch_wait / max(epoch_s, 1e-9), epoch_s)  # fmt: skip
        return entry

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def flops_per_sample(model: CLAP, model_cfg: Any) -> float:
    """Forward FLOPs of one clip + one caption (counted once, on a batch of 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = eval_template(model_cfg, torch.device("cpu"))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        forward(model.eval(), x)
    model.train()
    return float(fc.get_total_flops())


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("CLAP_FAST_PEAK_FLOPS"):
        return float(os.environ["CLAP_FAST_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


class Throughput:
    """Training meters: a window (since the last report) and the epoch's totals."""

    def __init__(self, flops_per_sample: float, d: Dist) -> None:
        self.flops, self.peak, self.world = flops_per_sample, peak_flops(d.device), d.world
        self.start_epoch()

    def start_epoch(self) -> None:
        self.epoch_loss, self.epoch_steps, self.epoch_wait = 0.0, 0, 0.0
        self.epoch_t = time.perf_counter()
        self._reset_window()

    def _reset_window(self) -> None:
        self.loss, self.n, self.samples, self.seconds, self.wait = 0.0, 0, 0, 0.0, 0.0
        self.t = time.perf_counter()

    def add(self, loss: float, samples: int, audio_seconds: float, wait: float) -> None:
        """One step: its loss, the global batch (samples, seconds of audio), this rank's data wait."""
        self.loss += loss
        self.n += 1
        self.samples += samples
        self.seconds += audio_seconds
        self.wait += wait
        self.epoch_loss += loss
        self.epoch_steps += 1
        self.epoch_wait += wait

    def report(self, lr: float, logit_scale: float) -> dict[str, float]:
        """The window's ``train/*`` scalars; starts a new window."""
        dt = time.perf_counter() - self.t
        sps = self.samples / dt
        vals = {
            "train/loss": self.loss / self.n, "train/lr": lr, "train/logit_scale": logit_scale,
            "train/samples_per_s": sps, "train/audio_seconds_per_s": self.seconds / dt,
            "train/data_wait_fraction": self.wait / dt,
        }  # fmt: skip
        vals["train/tflops_per_s_per_rank"] = 3 * self.flops * sps / self.world / 1e12
        if self.peak:
            vals["train/mfu"] = 3 * self.flops * sps / self.world / self.peak
        self._reset_window()
        return vals


def format_table(metrics: dict[str, float]) -> str:
    """The final metrics as a two-column text table."""
    keys = [k for k in metrics if not k.endswith("num_samples")]
    width = max((len(k) for k in keys), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {metrics[k]:.4f}" for k in keys]
    return "\n".join(lines) + "\n"
