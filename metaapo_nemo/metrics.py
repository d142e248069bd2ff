"""What a user sees and what a run leaves behind: console lines with progress bars (rank 0 only),
and metrics.jsonl, one JSON object per optimiser step or phase event."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Console:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._rich = RichConsole(stderr=False, highlight=False)

    def log(self, message: str) -> None:
        if self.enabled:
            self._rich.log(message)

    @contextlib.contextmanager
    def progress(self, description: str, total: int):
        """Yield `advance(note="")`, which moves the bar one unit and shows a short note beside it.

        Off a terminal (CI logs), a line every ~10% replaces the bar.
        """
        if not self.enabled:
            yield lambda note="": None
            return
        if not self._rich.is_terminal:
            done = 0
            every = max(1, math.ceil(total / 10))

            def advance(note: str = "") -> None:
                nonlocal done
                done += 1
                if done % every == 0 or done == total:
                    self._rich.log(f"{description}: {done}/{total} {note}")

            yield advance
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
        with Progress(*columns, console=self._rich, transient=False) as bar:
            task = bar.add_task(description, total=total, note="")
            yield lambda note="": bar.update(task, advance=1, note=note)


class MetricsWriter:
    """Appends JSON lines to output_dir/metrics.jsonl; every line carries `step` and `iteration`.
    `loggers` (loggers.ExperimentLoggers) get every row written, for TensorBoard and W&B."""

    def __init__(self, path: str | Path, enabled: bool = True, loggers=None):
        self.path, self.enabled, self.loggers = Path(path), enabled, loggers

    def write(self, event: str, step: int, iteration: int, **values) -> None:
        if not self.enabled:
            return
        row = {"event": event, "step": step, "iteration": iteration, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.loggers is not None:
            self.loggers.log(event, step, row)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def line_count(self) -> int:
        """Lines written so far (a checkpoint records it, and a resume cuts the file back to it)."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)

    def truncate_to(self, lines: int) -> None:
        """Keep the first `lines` lines: what a run interrupted after its checkpoint wrote is dropped."""
        if self.enabled and self.path.exists():
            with open(self.path, "rb") as f:
                kept = [line for _, line in zip(range(lines), f)]
            self.path.write_bytes(b"".join(kept))
        if self.enabled and self.loggers is not None:
            # The loggers restart at the last kept step, and get that step's rows again: TensorBoard's
            # purge drops whatever the interrupted run logged from that step on.
            rows = self.read()
            step = rows[-1]["step"] if rows else 0
            self.loggers.restart_at(step)
            for row in (r for r in rows if r["step"] == step):
                self.loggers.log(row["event"], step, row)

    def close(self) -> None:
        """Flush and close the loggers: at the end of the run, finished or failed."""
        if self.loggers is not None:
            self.loggers.close()


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
