"""``commit_masks``: fold reversible masks into plain weights."""

import graphprune
from graphprune.ir.masks import commit_masks as commit


@graphprune.register_pass("commit_masks")
def commit_masks(graph, config):
    """Fold pruning masks and parametrizations into the weights (needed before saving).

    Example:
        >>> graph, info = graphprune.run_pass(graph, "commit_masks")
    """
    return graph, {"modules": len(commit(graph))}
