"""LayerDrop (Fan et al. 2019, "Reducing Transformer Depth on Demand with Structured Dropout").

During fine-tuning every encoder layer is skipped with probability ``p`` in each
training forward pass: the layer's input goes on in place of its output, so the
layer gets no gradient in that step and the model learns to work with fewer layers
(``remove_layers`` with ``schedule = "every_other"`` or ``depth`` then prunes it,
as the paper does). In evaluation every layer runs.

fx graphs have no control flow, so a skipped layer is still computed in the traced
graph; only its result is dropped. The speed-up of the paper's training loop is not
had, the regularisation is.

Under several processes (``accelerate launch``) a skipped layer's parameters get no
gradient, which DDP without ``find_unused_parameters`` refuses; ``finetune`` does not
set that, so LayerDrop is refused there with a clear error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ir.layers import layer_spans

CALLER = "finetune (layerdrop)"


class SkipDraws:
    """The one generator all of a graph's skips draw from, and what each drew last.

    Its own generator, not torch's global one, so that dropout and data order in
    the rest of training are those of a run without LayerDrop. Shared by reference,
    so ``graph.copy()`` (deepcopy) gives the copy one shared copy of it.
    """

    def __init__(self, p: float, seed: int):
        self.p = float(p)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.skipped: dict[int, bool] = {}  # layer index -> skipped in the last training forward

    def draw(self, index: int) -> bool:
        skip = float(torch.rand((), generator=self.generator)) < self.p
        self.skipped[index] = skip
        return skip


class LayerSkip(nn.Module):
    """``forward(input, output)``: ``input`` with probability ``p`` in training, else ``output``.

    No parameters or buffers: it exists only while ``finetune`` runs.
    """

    def __init__(self, index: int, draws: SkipDraws):
        super().__init__()
        self.index = int(index)
        self.draws = draws

    def forward(self, layer_input, layer_output):
        if self.training and self.draws.draw(self.index):
            return layer_input
        return layer_output

    def extra_repr(self) -> str:
        return f"layer={self.index}, p={self.draws.p}"


class LayerDrop:
    """Finetune callback: every encoder layer skipped with probability ``p`` per training forward.

    One draw per layer per forward, in layer order, from one generator seeded with
    ``seed``. ``on_train_end`` (which ``finetune`` also runs after an error) removes
    the skips, so the graph has the same code and state_dict keys as before.
    ``last_skipped`` lists the layers the last training forward skipped.

    Example:
        >>> graphprune.finetune(graph, train, tok, layerdrop=0.2)   # builds LayerDrop(0.2, seed=0)
        >>> graph, _ = graphprune.run_pass(graph, "remove_layers", {"schedule": "every_other"})
    """

    def __init__(self, p: float, seed: int = 0):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"finetune: layerdrop = {p!r} is not allowed; expected a probability in [0, 1)")
        self.p = float(p)
        self.seed = int(seed)
        self.draws: SkipDraws | None = None

    @property
    def last_skipped(self) -> list[int]:
        return [] if self.draws is None else sorted(i for i, skip in self.draws.skipped.items() if skip)

    def on_train_begin(self, graph, total_steps: int) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                "finetune: layerdrop is not supported under several processes yet: a skipped layer gets no gradient, "
                "which DDP refuses without find_unused_parameters; fine-tune in one process"
            )
        gm = graph.module
        if not any("graphprune.common" in n.meta for n in gm.graph.nodes):
            from ..infra.pipeline import run_pass

            run_pass(graph, "init_metadata", inplace=True)
        spans = layer_spans(graph, CALLER)  # before any edit, so a structure error leaves the graph as it was
        self.draws = SkipDraws(self.p, self.seed)
        # From the top: a skip built first reads the layer output below it, which the next rewiring
        # turns into that layer's skip, so a skipped layer passes on what the layer below passed on.
        for span in reversed(spans):
            target = _free_name(gm, f"layerdrop_skip_{span.index}")
            gm.add_submodule(target, LayerSkip(span.index, self.draws))
            with gm.graph.inserting_after(span.output):
                skip = gm.graph.call_module(target, (span.input, span.output))
            # No graphprune.common record: layer_spans counts the skip as outside every layer.
            skip.meta["nn_module_stack"] = dict(span.output.meta.get("nn_module_stack", {}))
            span.output.replace_all_uses_with(skip, delete_user_cb=lambda user, skip=skip: user is not skip)
        gm.graph.lint()
        gm.recompile()

    def on_train_end(self, graph) -> None:
        # Found by module type rather than kept node references, in case another callback re-wired around them.
        gm = graph.module
        skips = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LayerSkip)]
        for node in skips:
            node.replace_all_uses_with(node.args[1])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
        if skips:
            gm.graph.lint()
            gm.recompile()


def _free_name(gm: nn.Module, name: str) -> str:
    taken = dict(gm.named_children())
    candidate, n = name, 1
    while candidate in taken or hasattr(gm, candidate):
        candidate, n = f"{name}_{n}", n + 1
    return candidate
