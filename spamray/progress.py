"""How far a long run is: a bar on a terminal, a line every few seconds anywhere else (a log
file, `ray job logs`), where a bar's redraws would be noise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

LINE_EVERY_S = 10.0


class Progress:
    """Counts `done` of `total` units (None when the total is not known) and shows it."""

    def __init__(self, what: str, total: int | None, unit: str, logger: logging.Logger,
                 interactive: bool | None = None, line_every_s: float = LINE_EVERY_S):
        self.what, self.total, self.unit, self.logger = what, total, unit, logger
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.line_every_s = line_every_s
        self.done, self.fields, self.baseline = 0, {}, 0
        self.created = self.started = self.last_line = time.monotonic()
        self.bar = (tqdm(total=total, desc=what, unit=f" {unit}", unit_scale=(total or 0) >= 10_000,
                         dynamic_ncols=True, file=sys.stderr, leave=False) if self.interactive else None)

    def update(self, done: int, **fields) -> None:
        """Sets how many units are done, with extra figures to show (loss, epoch, …)."""
        if self.done == 0 and done > 0:  # rates count from the first update, not from start-up
            self.started, self.baseline = time.monotonic(), done
            if self.bar is not None:
                self.bar.reset(total=self.total)
        if self.bar is not None:
            self.bar.update(done - self.done)
            if fields:
                self.bar.set_postfix({k: format_field(v) for k, v in fields.items()}, refresh=False)
        self.done, self.fields = done, fields
        if self.bar is None and time.monotonic() - self.last_line >= self.line_every_s:
            self.logger.info(self.line())
            self.last_line = time.monotonic()

    def line(self) -> str:
        """One line for logs: `what: 1,200 of 5,574 rows (22%), 410 rows/s, 11 s left; loss 0.31`."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.baseline) / elapsed
        if self.done == self.baseline:  # one update so far: count it from the start
            elapsed = max(time.monotonic() - self.created, 1e-9)
            rate = self.done / elapsed
        text = f"{self.what}: {self.done:,}"
        if self.total:
            text += f" of {self.total:,} {self.unit} ({self.done / self.total:.0%})"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", {format_duration((self.total - self.done) / rate)} left"
        if self.fields:
            text += "; " + ", ".join(f"{k} {format_field(v)}" for k, v in self.fields.items())
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.done:
            self.logger.info(self.line())


def format_field(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
