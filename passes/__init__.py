"""graphprune's built-in pass library.

Grouped by family (``analysis``, ``pruning``, ...); each module registers one pass
with ``graphprune.register_pass``, exactly as a user's own pass would. graphprune
finds this package through the ``graphprune.passes`` entry point and never imports
it by name.
"""

from . import analysis, pruning, quantization, structured  # noqa: F401  (registration)
