"""A time budget for a search (``graphprune compress``'s): wall-clock seconds from start to exit, everything included.

The run has three parts: the fixed work before the trials (loading, the dense model's
measurements and exports), the trials, and the finale (timing the best candidates again,
scoring the chosen one on test, exporting it, evaluating the artefact). The finale's
cost is estimated from what the dense measurements took; a trial's from the trials that
have finished (before any has, from a prior the caller estimates). No trial starts that
would end past the time the finale needs; what is left after the last trial that fits
goes to more timing rounds in the finale (at least ``MIN_ROUNDS``), so the run ends near
its budget, not far before it: it aims at ``AIM`` of the budget and must end within
``LOW`` to ``HIGH`` of it unless the trials run out first.
"""

from __future__ import annotations

import math
import re
import time

LOW, HIGH, AIM = 0.85, 1.10, 0.95
MIN_ROUNDS = 30  # interleaved timing rounds per candidate in the finale
UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(value, where: str = "compress: --time") -> float:
    """``90s``, ``30m``, ``1h``, ``1h30m`` or a number of seconds, as seconds (> 0)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d+)?\s*[smh]\s*)+", value.lower()):
        seconds = sum(float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smh])", value.lower()))
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        seconds = float(value)
    else:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{where} = {value!r} is not allowed; expected a duration such as 90s, 30m, 1h or 1h30m")
    return seconds


class Budget:
    """How much of ``seconds`` is used and left, on ``clock`` (a fake one in tests)."""

    def __init__(self, seconds: float, clock=time.monotonic, margin: float = 1.15, start: float | None = None):
        self.total, self.clock = float(seconds), clock
        self.start = clock() if start is None else start  # the command's start: loading counts too
        self.finale = 0.0        # estimated seconds of the work after the trials
        self.prior = None        # estimated seconds of one trial before any has finished
        self.margin = margin     # a trial is assumed to take this much more than the slowest so far

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()

    def trial_estimate(self, durations: list[float]) -> float:
        """The next trial's seconds: the slowest finished one (trials differ by their recovery steps), with the margin."""
        done = [d for d in durations if d is not None and d > 0]
        if not done:
            return self.margin * (self.prior or 0.0)
        return self.margin * max(done)

    def may_start(self, durations: list[float]) -> bool:
        """Whether one more trial ends before the finale must begin."""
        return self.left() - self.finale >= self.trial_estimate(durations)

    def check_fits(self, fixed: float, trial: float, finale: float, where: str = "compress") -> None:
        """Refuse, before any work, a budget that cannot hold the fixed work, one trial and the finale."""
        need = fixed + trial + finale
        if self.total < need:
            raise ValueError(f"{where}: --time {format_seconds(self.total)} is too short for one trial: about {format_seconds(need)} is needed "
                             f"here ({format_seconds(fixed)} to load and measure the dense model, {format_seconds(trial)} for a trial, "
                             f"{format_seconds(finale)} to time, test and export the choice); give at least --time {format_seconds(math.ceil(need / 60) * 60)}")

    def rounds(self, seconds_per_round: float, after: float = 0.0) -> int:
        """Timing rounds for the finale: at least MIN_ROUNDS, more while the run would still end by AIM of the budget
        (``after``: the seconds of finale work that follow the timing)."""
        spare = AIM * self.total - self.elapsed() - after
        if seconds_per_round <= 0:
            return MIN_ROUNDS
        return max(MIN_ROUNDS, int(spare / seconds_per_round))


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds % 60 else f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def deadline_gate(stop_at: float, prior: float, clock=time.time):
    """``may_start(study)`` for a worker process that must not start a trial it cannot end by ``stop_at`` (seconds since
    the epoch, so that processes agree): a :class:`Budget` ending then, with no finale of its own."""
    budget = Budget(max(0.0, stop_at - clock()), clock)
    budget.prior = prior

    def may_start(study) -> bool:
        done = study.get_trials(deepcopy=False)
        return budget.may_start([t.user_attrs.get("seconds") for t in done if "repeat_of" not in t.user_attrs])

    return may_start
