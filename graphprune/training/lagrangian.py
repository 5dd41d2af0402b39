"""Drive the expected size of a gated graph to its target during fine-tuning (FLOP, CoFi).

The gate method on the graph (``graph.meta["gates"]``) gives the expected remaining
size ``s`` as a differentiable fraction of the dense size; the target ``t`` is
warmed up linearly from ``s`` at the first step to ``graph.meta["gates"]["target"]``
over ``target_warmup`` of the steps. The loss gains

    lambda_1 (s - t) + lambda_2 (s - t)^2

where ``lambda_1`` and ``lambda_2`` start at 0 and are trained by gradient *ascent*
(AdamW with ``maximize``, learning rate ``reg_learning_rate``): while the graph is
larger than the target the multipliers grow and push the gates shut, so the constraint
is met without hand-tuning a penalty weight (Wang et al. 2019; Xia et al. 2022).

Unlike CoFi, the multipliers go back to 0 (and their optimiser state is dropped) at
every step that ends with the expected size at or below the target: the size is an
upper bound. Measured on MiniLM with one or two epochs' budget, CoFi's multipliers
wound up while the gates lagged the warm-up and kept shutting them long after the
target was passed (a target of 0.25 of the FLOPs ended at 0.034, 0.4 at 0.29); reset,
the gates stop where the target is. For the same reason the gates' own optimiser state
(Adam's moments) is dropped at the step the size first falls to the target: Adam moves
every gate at about its learning rate whatever its gradient, so while the multipliers
push, the gates of a kind close in lockstep, and their momentum alone carried them on
past the target (measured on MiniLM, half an epoch at target 0.25 of the FLOPs: 0.08 to
0.17 reached with the momentum kept).
"""

from __future__ import annotations

import torch

from ..ir.gates import GATES, gate_method, gate_modules


class LagrangianController:
    """A :func:`graphprune.finetune` callback built automatically when the graph carries gates."""

    def __init__(self, learning_rate: float = 1e-2, target_warmup: float = 0.5):
        self.learning_rate = learning_rate
        self.target_warmup = target_warmup
        self.history: list[dict] = []  # per step: expected size, target, multipliers

    def on_train_begin(self, graph, total_steps: int) -> None:
        self.method = gate_method(graph)
        record = graph.meta[GATES]
        self.final = float(record["target"])
        device = graph.device
        self.lambdas = torch.zeros(2, device=device, requires_grad=True)
        self.optimizer = torch.optim.AdamW([self.lambdas], lr=self.learning_rate, weight_decay=0.0, maximize=True)
        with torch.no_grad():
            self.start = float(self.method.expected_fraction(graph))
        self.warmup_steps = max(1, round(self.target_warmup * total_steps))
        self.gate_params = [g.log_alpha for g in gate_modules(graph).values()]
        self.graph_optimizer = None
        self.above = True

    def on_optimizer(self, optimizer) -> None:
        self.graph_optimizer = optimizer

    def target_at(self, step: int) -> float:
        progress = min(1.0, step / self.warmup_steps)
        return self.start + (self.final - self.start) * progress

    def extra_loss(self, graph, batch, step: int, total_steps: int) -> torch.Tensor:
        expected = self.method.expected_fraction(graph)
        target = self.target_at(step)
        gap = expected - target
        self.gap = float(gap.detach())
        lambdas = self.lambdas.detach().tolist()
        self.history.append({"step": step, "expected": float(expected.detach()), "target": target, "lambda_1": lambdas[0], "lambda_2": lambdas[1]})
        return self.lambdas[0] * gap + self.lambdas[1] * gap * gap

    def on_step_end(self, graph, step: int, total_steps: int) -> None:
        self.optimizer.step()  # ascent on the multipliers, from the gradient the step's backward left
        self.optimizer.zero_grad()
        if self.gap <= 0:  # within the bound: no pressure left, and no wound-up pressure to come
            with torch.no_grad():
                self.lambdas.zero_()
            self.optimizer.state.clear()
            if self.above and self.graph_optimizer is not None:  # just crossed: no momentum to carry the gates on
                for p in self.gate_params:
                    self.graph_optimizer.state.pop(p, None)
        self.above = self.gap > 0

    def on_train_end(self, graph) -> None:
        if not self.history:
            return
        last = self.history[-1]
        with torch.no_grad():
            expected = float(self.method.expected_fraction(graph))
        graph.meta[GATES]["trained"] = {
            "steps": last["step"] + 1, "expected_fraction": expected, "target": self.final,
            "lambda_1": last["lambda_1"], "lambda_2": last["lambda_2"],
        }
