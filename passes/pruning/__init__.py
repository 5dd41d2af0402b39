"""Pruning passes: masks on weights, and the step that commits them."""

from . import commit_masks, demo_magnitude_prune  # noqa: F401  (registration)
