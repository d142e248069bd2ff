"""What a user sees and what a run leaves behind: console lines with progress bars (rank 0 only),
and metrics.jsonl, one JSON object per optimiser step or phase event."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from rich.console import Console as RichConsole
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from metaapo_nemo import quiet


class _Rate(ProgressColumn):
    """Units per second (steps/s), or seconds per unit when slower than one a second."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("-- it/s", style="progress.data.speed")
        text = f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it"
        return Text(text, style="progress.data.speed")


class Console:
    """Rank 0's console: time-stamped lines without source paths, a progress bar per long phase on
    a terminal, plain lines elsewhere (CI, Slurm, a pipe). Every line also goes to the run's log
    (metaapo_nemo.quiet: output_dir/console.log, which also holds the third-party warnings)."""

    def __init__(self, enabled: bool = True, file=None, width: int | None = None, force_terminal: bool | None = None):
        self.enabled = enabled
        self._rich = RichConsole(file=file, width=width, force_terminal=force_terminal, highlight=False,
                                 log_path=False)
        self._live = 0  # a bar or spinner showing: rich allows one at a time

    def log(self, message: str) -> None:
        if self.enabled:
            self._rich.log(message)
            quiet.record(_plain_text(message))

    def print_table(self, table: Table) -> None:
        if self.enabled:
            self._rich.print(table)
            with self._rich.capture() as captured:
                self._rich.print(table)
            for line in captured.get().splitlines():
                quiet.record(line)

    @contextlib.contextmanager
    def progress(self, description: str, total: int, every: int | None = None):
        """Yield `advance(note="")`, which moves the bar one unit and shows a short note beside it.

        Off a terminal (CI logs), a line every `every` units (None: every ~10%) and the last replace
        the bar; on a terminal the log file gets those lines.
        """
        if not self.enabled:
            yield lambda note="": None
            return
        done = 0
        every = every or max(1, math.ceil(total / 10))

        def line(note: str) -> str | None:
            nonlocal done
            done += 1
            if done % every == 0 or done == total:
                return f"{description}: {done}/{total} {note}"
            return None

        if not self._rich.is_terminal or self._live:
            def advance(note: str = "") -> None:
                if (text := line(note)) is not None:
                    self.log(text)

            yield advance
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[note]}"))
        self._live += 1
        try:
            with Progress(*columns, console=self._rich, transient=False) as bar:
                task = bar.add_task(description, total=total, note="")

                def advance(note: str = "") -> None:
                    bar.update(task, advance=1, note=note)
                    if (text := line(note)) is not None:
                        quiet.record(text)

                yield advance
        finally:
            self._live -= 1

    @contextlib.contextmanager
    def phase(self, description: str):
        """A phase that is one call (scoring, sampling, annotation, evaluation): a spinner on a
        terminal, then a line with its duration; off a terminal the line goes to the log file only."""
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        if self._rich.is_terminal and not self._live:
            self._live += 1
            try:
                with self._rich.status(f"{description} ..."):
                    yield
            finally:
                self._live -= 1
            self.log(f"  {description}: {time.perf_counter() - started:.1f} s")
        else:
            yield
            quiet.record(f"  {description}: {time.perf_counter() - started:.1f} s")


def summary_table(summary: dict) -> Table:
    """The run's headline numbers (summary.json) as a table."""
    table = Table(title=f"{summary.get('algorithm', 'run')}: {summary.get('iterations', 0)} iterations",
                  show_header=True, header_style="bold")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")

    def num(key, fmt):
        value = summary.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    table.add_row("held-out reward", f"{num('reward_initial', '.4f')} -> {num('reward_final', '.4f')}")
    if summary.get("win_rate_vs_start") is not None:
        table.add_row("win rate vs start", num("win_rate_vs_start", ".3f"))
    if "eval_reward_initial" in summary:  # a second reward scored the same held-out samples
        table.add_row("eval reward", f"{num('eval_reward_initial', '.4f')} -> {num('eval_reward_final', '.4f')}")
        if summary.get("eval_win_rate_vs_start") is not None:
            table.add_row("eval win rate vs start", num("eval_win_rate_vs_start", ".3f"))
    table.add_row("annotation ratio", f"{num('annotation_ratio', '.3f')} "
                                      f"({summary.get('prompts_annotated', 0)}/{summary.get('prompts_considered', 0)})")
    table.add_row("online pairs", str(summary.get("num_online_pairs", 0)))
    table.add_row("meta updates", str(summary.get("meta_updates", 0)))
    table.add_row("optimiser steps", str(summary.get("optimizer_steps", 0)))
    for phase, seconds in summary.get("seconds", {}).items():
        table.add_row(f"seconds: {phase}", f"{seconds:.1f}")
    tps = summary.get("tokens_per_second", {})
    for kind in ("training", "generation"):
        if isinstance(tps.get(kind), (int, float)):
            table.add_row(f"tokens/s: {kind}", f"{tps[kind]:.0f}")
    return table


def _plain_text(message: str) -> str:
    try:
        return Text.from_markup(message).plain
    except Exception:  # not markup after all
        return message


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
