"""``commit_gates``: the one step that turns trained gates into a smaller graph.

Whichever gate method put the gates on (``l0_structured``, ``factorize``), its
registered commit folds the evaluation gates into the weights and removes what they
closed; the committed graph computes what the gated graph computed at evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import graphprune
from graphprune.ir.gates import gate_method


@dataclass(frozen=True)
class CommitGatesConfig:
    """No fields."""


@graphprune.register_pass("commit_gates", config=CommitGatesConfig)
def commit_gates(graph, config: CommitGatesConfig):
    """Fold the gates (at their evaluation values) into the weights and remove the closed units.

    Example:
        >>> graph, info = graphprune.run_pass(graph, "commit_gates")
    """
    method = gate_method(graph)
    if method is None:
        raise ValueError("pass 'commit_gates': the graph carries no gates (run 'l0_structured' or 'factorize', then finetune)")
    trained = dict(graph.meta["gates"].get("trained", {}))
    info = method.commit(graph)
    return graph, {"method": method.name, **info, **({"trained": trained} if trained else {})}
