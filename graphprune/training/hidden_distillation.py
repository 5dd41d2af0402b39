"""Layer-wise hidden-state distillation from the dense graph, with layer matching (CoFi).

Each teacher layer's output hidden state is matched to a student layer's: with
``layer_map`` as given (student layer ``i`` learns teacher layer ``layer_map[i]``),
or else as CoFi does (Xia et al. 2022), anew on every batch: teacher layers in order,
each to the student layer (at or after the previous match) whose transformed hidden
state is closest, so a student whose gates shut whole layers still learns from the
teacher layers it can represent. The loss is the mean squared error over real tokens,
summed over matched layers, times ``weight``:

    weight * sum_t MSE(W h_student[m(t)], h_teacher[t])

with ``W`` a hidden x hidden Linear initialised to the identity and trained with the
graph (CoFi's layer transformation: it lets a student whose hidden dimensions are
gated shut still match). The hidden states are read by tap nodes put after each
layer's output for the duration of training and removed afterwards, in both graphs.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..ir.layers import layer_spans


class HiddenTap(nn.Module):
    """Passes its input through and keeps it, for the loss of the current step."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, x):
        self.value = x
        return x


def _add_taps(graph, caller: str) -> list[str]:
    gm = graph.module
    if not any("graphprune.common" in n.meta for n in gm.graph.nodes):
        from ..infra.pipeline import run_pass

        run_pass(graph, "init_metadata", inplace=True)
    targets = []
    for span in layer_spans(graph, caller):
        target = f"hidden_tap_{span.index}"
        gm.add_submodule(target, HiddenTap())
        users = list(span.output.users)
        with gm.graph.inserting_after(span.output):
            tap = gm.graph.call_module(target, (span.output,))
        for user in users:
            user.replace_input_with(span.output, tap)
        targets.append(target)
    gm.recompile()
    return targets


def _remove_taps(graph, targets: list[str]) -> None:
    gm = graph.module
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in targets:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for target in targets:
        if hasattr(gm, target):
            delattr(gm, target)
    gm.recompile()


class HiddenDistillation:
    """The ``kd_hidden_weight`` option of :func:`graphprune.finetune` (a callback it builds)."""

    def __init__(self, teacher, weight: float, layer_map: list[int] | None = None):
        self.teacher, self.weight, self.layer_map = teacher, weight, layer_map
        self.matches: list[list[int]] = []  # per step, the student layer of each teacher layer (for logs and tests)

    def on_train_begin(self, graph, total_steps: int) -> None:
        self.student_taps, self.teacher_taps = [], []
        try:
            self._begin(graph)
        except BaseException:
            self.on_train_end(graph)  # finetune undoes only the callbacks whose on_train_begin returned: take the taps out here
            raise

    def _begin(self, graph) -> None:
        self.student_taps = _add_taps(graph, "finetune (kd_hidden_weight)")
        self.teacher_taps = _add_taps(self.teacher, "finetune (kd_hidden_weight, teacher)")
        if self.layer_map is not None:
            if len(self.layer_map) != len(self.student_taps) or max(self.layer_map) >= len(self.teacher_taps):
                raise ValueError(
                    f"finetune: kd_layer_map = {self.layer_map!r} is not allowed; expected {len(self.student_taps)} teacher "
                    f"layer indices (one per student layer), each in 0..{len(self.teacher_taps) - 1}"
                )
        val = layer_spans(graph, "finetune (kd_hidden_weight)")[0].output.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError("finetune: kd_hidden_weight needs the shapes of the layer outputs (graph node metadata 'val')")
        hidden = int(val.shape[-1])
        teacher_val = layer_spans(self.teacher, "finetune (kd_hidden_weight, teacher)")[0].output.meta.get("val")
        if isinstance(teacher_val, torch.Tensor) and int(teacher_val.shape[-1]) != hidden:
            raise ValueError(
                f"finetune: kd_hidden_weight needs the student's hidden size ({hidden}) to equal the teacher's "
                f"({int(teacher_val.shape[-1])}); after remove_hidden distil the logits only (kd_hidden_weight = 0)"
            )
        self.transform = nn.Linear(hidden, hidden, device=graph.device)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(hidden))
            self.transform.bias.zero_()

    def on_optimizer(self, optimizer) -> None:
        optimizer.add_param_group({"params": list(self.transform.parameters()), "weight_decay": 0.0})

    def extra_loss(self, graph, batch, step: int, total_steps: int) -> torch.Tensor:
        gm, tm = graph.module, self.teacher.module
        student = [self.transform(gm.get_submodule(t).value) for t in self.student_taps]
        teacher = [tm.get_submodule(t).value for t in self.teacher_taps]
        mask = batch.get("attention_mask")
        keep = mask.bool() if mask is not None else torch.ones(student[0].shape[:2], dtype=torch.bool, device=student[0].device)

        def mse(s, t):
            return ((s - t)[keep] ** 2).mean()

        if self.layer_map is not None:
            pairs = list(zip(range(len(student)), self.layer_map))
        else:
            pairs, first = [], 0
            with torch.no_grad():
                for t in range(len(teacher)):
                    errors = [float(mse(student[s], teacher[t])) for s in range(first, len(student))]
                    if not errors:
                        break
                    first += min(range(len(errors)), key=errors.__getitem__)
                    pairs.append((first, t))
        self.matches.append([s for s, _ in pairs])
        return self.weight * sum(mse(student[s], teacher[t]) for s, t in pairs)

    def on_train_end(self, graph) -> None:
        _remove_taps(graph, self.student_taps)
        _remove_taps(self.teacher, self.teacher_taps)
        for taps in (graph, self.teacher):
            for m in taps.module.modules():
                if isinstance(m, HiddenTap):
                    m.value = None
