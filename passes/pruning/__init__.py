"""Pruning passes: masks on weights and activations, and the step that commits them."""

from . import commit_masks, prune, prune_activation, prune_weight  # noqa: F401  (registration)
