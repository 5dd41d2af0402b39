"""Training and data: datasets, models, evaluation, fine-tuning, schedules, timing, the baseline.

May import ``graphprune.ir`` and ``graphprune.infra``.
"""
