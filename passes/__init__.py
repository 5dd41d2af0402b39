"""graphprune's built-in pass library.

Each module registers one pass with ``graphprune.register_pass``, exactly as a
user's own pass would. graphprune finds this package through the
``graphprune.passes`` entry point.
"""

from . import add_common_metadata, commit_masks, demo_magnitude_prune, init_metadata  # noqa: F401  (registration)
