"""Which trials a search keeps: the feasible ones, the Pareto front, the best under the constraints."""

from __future__ import annotations

from .job import SearchJob
from .objectives import METRICS, QUALITY


def feasible(trial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def pareto_front(job: SearchJob, trials: list) -> list:
    """Non-dominated completed trials, among the feasible ones when there are any; a repeated pipeline once."""
    trials = [t for t in trials if "repeat_of" not in t.user_attrs]
    pool = [t for t in trials if feasible(t)] or trials
    signs = [1 if METRICS[o] == "maximize" else -1 for o in job.objectives]

    def key(t):
        return [s * v for s, v in zip(signs, t.values)]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    keys = {t.number: key(t) for t in pool}
    front = [t for t in pool if not any(dominates(keys[o.number], keys[t.number]) for o in pool if o is not t)]
    return sorted(front, key=lambda t: t.values[0], reverse=METRICS[job.objectives[0]] == "maximize")


def best_trial(job: SearchJob, trials: list):
    """Under the constraints, the best by the first objective that is not a quality metric (the first one if
    quality metrics are alone), ties broken by the first quality objective."""
    pool = [t for t in trials if feasible(t) and "repeat_of" not in t.user_attrs]
    if not pool:
        return None
    others = [o for o in job.objectives if o not in QUALITY]
    name = others[0] if others else job.objectives[0]
    index = job.objectives.index(name)
    sign = 1 if METRICS[name] == "maximize" else -1
    quality = next((o for o in job.objectives if o in QUALITY), None)
    return max(pool, key=lambda t: (sign * t.values[index], t.user_attrs["metrics"].get(quality, 0.0) if quality else 0.0))
