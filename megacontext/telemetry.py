"""MegaContext telemetry: the counters and gauges of the focus loop in one place (docs/design.md §3, §4).

Callers record events (a refocus, a timed controller step, an NLL pair); `summary()` turns the window since
the last reset into one flat dict with `mc/...` keys, which is both the training log line's payload
(`format_line`) and what a caller passes to wandb.log. Nothing here talks to wandb or any other sink, so a
run with `--run dummy` pays only for a few list appends.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager

from megacontext.entries import Edit
from megacontext.working_context import WorkingContext


class Telemetry:
    """Window statistics (means since the last reset) plus latest gauges and bounded focus-map snapshots."""

    def __init__(self, max_snapshots: int = 8, snapshot_every: int = 100):
        self.snapshot_every = snapshot_every
        self.snapshots: deque[tuple[int, str]] = deque(maxlen=max_snapshots)  # (refocus number, render())
        self.total_refocuses = 0
        self.reset()

    def reset(self) -> None:
        """Start a new window (call after logging a summary)."""
        self.refocuses = 0
        self.edits = 0
        self.swap_rates: list[float] = []
        self.times_ms: dict[str, list[float]] = {}
        self.nll: list[tuple[float, float]] = []  # (mc nll, baseline nll)
        self.gauges: dict[str, float] = {}

    def record_refocus(self, wc: WorkingContext, edits: list[Edit]) -> None:
        """One refocus: swap rate = edits / WC entries, and the WC's gauges after the edits."""
        self.refocuses += 1
        self.total_refocuses += 1
        self.edits += len(edits)
        self.swap_rates.append(len(edits) / max(wc.num_entries, 1))
        self.gauges["mc/residency"] = wc.residency
        self.gauges["mc/num_entries"] = wc.num_entries
        self.gauges["mc/cost"] = wc.cost
        self.gauges["mc/num_tokens"] = wc.num_tokens
        for key in [k for k in self.gauges if k.startswith("mc/lod_hist/")]:
            del self.gauges[key]  # a level that vanished must not keep its old count
        for level, count in wc.lod_histogram().items():
            self.gauges[f"mc/lod_hist/L{level}"] = count
        if self.snapshot_every > 0 and (self.total_refocuses - 1) % self.snapshot_every == 0:
            self.snapshots.append((self.total_refocuses - 1, wc.render()))

    @contextmanager
    def timer(self, name: str = "controller"):
        """Wall time of the block in ms, reported as `mc/time_<name>_ms`. On CUDA the caller synchronises
        inside the block if it wants device time rather than launch time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times_ms.setdefault(name, []).append((time.perf_counter() - t0) * 1000.0)

    def record_delta_nll(self, nll: float, baseline_nll: float) -> None:
        """Per-token NLL of the MC working context and of the baseline it is compared with (ΔNLL = mc - base)."""
        self.nll.append((float(nll), float(baseline_nll)))

    def gauge(self, name: str, value: float) -> None:
        """Any other gauge under the same namespace (e.g. `mc/preference_agreement`)."""
        self.gauges[name if name.startswith("mc/") else f"mc/{name}"] = float(value)

    def summary(self, reset: bool = False) -> dict[str, float]:
        """Flat dict of the window; keys present only when something was recorded for them."""
        out: dict[str, float] = {}
        if self.refocuses:
            out["mc/refocuses"] = self.refocuses
            out["mc/edits_per_refocus"] = self.edits / self.refocuses
            out["mc/swap_rate"] = sum(self.swap_rates) / len(self.swap_rates)
        for name, values in self.times_ms.items():
            out[f"mc/time_{name}_ms"] = sum(values) / len(values)
        if self.nll:
            mc = sum(a for a, _ in self.nll) / len(self.nll)
            base = sum(b for _, b in self.nll) / len(self.nll)
            out.update({"mc/nll": mc, "mc/baseline_nll": base, "mc/delta_nll": mc - base})
        out.update(self.gauges)
        if reset:
            self.reset()
        return out

    def focus_maps(self) -> list[str]:
        """The bounded focus-map snapshots, oldest first, as `#refocus [L2 0:1024][L1 ...]...` lines."""
        return [f"#{step} {text}" for step, text in self.snapshots]


def format_line(summary: dict[str, float]) -> str:
    """One compact log-line fragment, e.g. `swap_rate 0.0312 | residency 0.875 | time_controller_ms 0.41`."""
    parts = []
    for key, value in summary.items():
        short = key.removeprefix("mc/")
        parts.append(f"{short} {value}" if isinstance(value, int) else f"{short} {value:.4g}")
    return " | ".join(parts)
