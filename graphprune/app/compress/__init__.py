"""``graphprune compress``: one command from a model and its data to the fastest verified artefact within a stated loss.

    graphprune compress runs/my-bert --task text-classification --data job.toml --max-drop 1 --time 30m --out compressed

See :mod:`graphprune.app.compress.run` for the run, ``space.py`` for the default search space
and the benchmarks behind it, ``budget.py`` for the time budget, ``choose.py`` for the
choice and ``outputs.py`` / ``html.py`` for what it writes.
"""

from .run import compress

__all__ = ["compress"]
