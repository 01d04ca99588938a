"""Progress of a running job: one event per finished shard, shown three ways.

* in the terminal: rich progress bars, one per phase (phase and layer, shards done, samples and
  tokens per second, ETA), when stderr is a terminal; plain log lines every few seconds
  otherwise (Ray Jobs logs, CI);
* on the Ray dashboard: the same numbers as Ray metrics (``ribray_shards_done``,
  ``ribray_shards_total``, ``ribray_samples_per_second``, ``ribray_tokens_per_second``,
  tagged with the job name and phase), exported by Ray's metrics agent;
* in the store: the root attribute ``progress`` (phase, shards done and total, rates), which
  ``ribray status`` and notebooks read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    """The state of one phase after a shard finished. ``phase`` names the layer too
    (``gram``, ``M/ln2.0``, ``edges/ln2.0--unembed``); rates count this run's shards only."""

    job: str
    phase: str
    done: int
    total: int
    elapsed: float
    samples_per_s: float
    tokens_per_s: float
    computed: int = 0  # shards computed by this run (done also counts those kept before)

    @property
    def eta(self) -> float | None:
        """Seconds left at this run's rate (None before the first shard of this run)."""
        if self.done >= self.total:
            return 0.0
        if self.computed <= 0:
            return None
        return self.elapsed / self.computed * (self.total - self.done)

    def line(self) -> str:
        eta = self.eta
        return (f"  {self.phase}: {self.done}/{self.total} shards, {self.elapsed:.1f}s, "
                f"{self.samples_per_s:.0f} samples/s, {self.tokens_per_s:.0f} tokens/s"
                + (f", ETA {eta:.0f}s" if eta else ""))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "eta": self.eta}


class Reporter:
    """Fans an :class:`Event` out to the terminal (or log), the Ray metrics and the store."""

    def __init__(self, log: Callable[[str], None], store_progress=None, bars: bool = False,
                 log_every: float = 2.0, listener: Callable[[Event], None] | None = None):
        self.log, self.store_progress, self.log_every = log, store_progress, log_every
        self.listener = listener
        self._last_log, self._last_store = 0.0, 0.0
        self._bars = _Bars() if bars else None
        self._metrics = _metrics()

    def __call__(self, ev: Event) -> None:
        now = time.monotonic()
        final = ev.done >= ev.total
        if self.listener is not None:
            self.listener(ev)
        if self._bars is not None:
            self._bars.update(ev)
        elif final or now - self._last_log > self.log_every:
            self._last_log = now
            self.log(ev.line())
        if self.store_progress is not None and (final or now - self._last_store > 1.0):
            self._last_store = now
            self.store_progress(ev.as_dict())
        if self._metrics is not None:
            tags = {"job": ev.job, "phase": ev.phase}
            done, total, sps, tps = self._metrics
            done.set(ev.done, tags=tags)
            total.set(ev.total, tags=tags)
            sps.set(ev.samples_per_s, tags=tags)
            tps.set(ev.tokens_per_s, tags=tags)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.close()


_METRICS: tuple | None = None


def _metrics() -> tuple | None:
    """Ray gauges (created once per process; None where Ray's metrics are unavailable)."""
    global _METRICS
    if _METRICS is None:
        try:
            from ray.util.metrics import Gauge

            keys = ("job", "phase")
            _METRICS = (Gauge("ribray_shards_done", "shards finished in this phase", keys),
                        Gauge("ribray_shards_total", "shards in this phase", keys),
                        Gauge("ribray_samples_per_second", "samples per second", keys),
                        Gauge("ribray_tokens_per_second", "tokens per second", keys))
        except Exception:  # noqa: BLE001 - metrics are a convenience, never a failure
            return None
    return _METRICS


class _Bars:
    """rich progress bars on stderr, one per phase."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description:<28}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("shards"),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
        self.tasks: dict[str, Any] = {}
        self.progress.start()

    def update(self, ev: Event) -> None:
        if ev.phase not in self.tasks:
            self.tasks[ev.phase] = self.progress.add_task(ev.phase, total=ev.total, rate="")
        rate = f"{ev.samples_per_s:,.0f} samples/s · {ev.tokens_per_s:,.0f} tok/s"
        self.progress.update(self.tasks[ev.phase], completed=ev.done, rate=rate)

    def close(self) -> None:
        self.progress.stop()
