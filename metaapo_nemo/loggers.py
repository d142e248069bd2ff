"""Experiment logging, NeMo-RL's `logger` keys (config.LoggerConfig): the numeric scalars of every
metrics.jsonl row, tagged `<event>/<key>` at the row's step, to TensorBoard and/or Weights & Biases.

MetricsWriter hands each row here as it writes it, so these hold what metrics.jsonl holds, from the
rank that writes it. Lists and strings (per-prompt rewards, prompt ids, the algorithm's name) stay
in metrics.jsonl only.
"""
from __future__ import annotations

import os
from pathlib import Path

from metaapo_nemo.config import MetaAPOConfig

ROW_COORDINATES = ("event", "step", "iteration")  # where a row sits, not what it measured


class ExperimentLoggers:
    """The backends `config.logger` turns on, opened at the first row (so that a resume can say first
    where the previous run's logging stops counting) and closed by `close()`."""

    def __init__(self, config: MetaAPOConfig):
        self.config = config
        self.log_dir = Path(config.logger.log_dir or os.path.join(config.output_dir, "logs"))
        self.enabled = config.logger.tensorboard_enabled or config.logger.wandb_enabled
        self._purge_step = None
        self._tensorboard = self._wandb = None
        self._opened = False

    def restart_at(self, step: int) -> None:
        """A run continues from a checkpoint at optimiser step `step`: TensorBoard drops every point the
        previous process logged at `step` or later (its purge_step), which the caller logs again."""
        self._purge_step = step

    def log(self, event: str, step: int, row: dict) -> None:
        if not self.enabled:
            return
        scalars = {f"{event}/{key}": float(value) for key, value in row.items()
                   if key not in ROW_COORDINATES and isinstance(value, (int, float))}
        if not self._opened:
            self._open()
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the backends (the end of a run, finished or failed); logging after it is off."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tensorboard = self._wandb = None
        self.enabled = False

    def _open(self) -> None:
        self._opened = True
        logger = self.config.logger
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if logger.tensorboard_enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"), purge_step=self._purge_step)
        if logger.wandb_enabled:
            import wandb

            w = logger.wandb
            run_config = self.config.to_dict()
            if run_config["reward"]["token"]:  # a bearer token stays off W&B's servers
                run_config["reward"]["token"] = "<set>"
            # A resumed run is a new W&B run of the same name, from the checkpoint's step on.
            self._wandb = wandb.init(mode=w.mode, dir=str(self.log_dir), project=w.project,
                                     name=w.name or Path(self.config.output_dir).name, entity=w.entity or None,
                                     config=run_config)
