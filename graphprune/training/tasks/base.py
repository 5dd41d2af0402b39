"""What every task provides, and the parts tasks share: the evaluation loop, output distributions, Fisher terms.

A task (``text-classification``, ``token-classification``, ``question-answering``,
``feature-extraction``: HF's pipeline names) is written once, as one object that
knows how its data is tokenised and aligned, what its model's outputs mean as
probability distributions, how a student is distilled toward a teacher, and which
metrics users report. Evaluation, fine-tuning, the structured search and export ask
the task; nothing else branches on the task's name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class Task:
    """One task. Subclasses set the class attributes and implement the methods that raise here.

    Attributes:
        name: HF's pipeline name.
        head: the traced graph's head (``ModelCall.task``): what a model of this task is.
        main_metric: the metric searches, tables and drops use by default.
        metrics: every metric ``evaluate`` returns for this task (besides ``examples``).
        targets: the batch keys that carry the training targets.
    """

    name = ""
    head: str | None = None
    main_metric = ""
    metrics: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    # Above this many classes per position the Fisher is sampled rather than summed over classes.
    exact_classes = 16

    # --- data ---------------------------------------------------------------------------
    def collate(self, rows: list, tokenizer, max_length: int) -> dict:
        """A training or calibration batch: model inputs and targets, tensors of equal rows."""
        raise NotImplementedError

    def eval_features(self, rows: list, tokenizer, max_length: int) -> tuple[dict, object]:
        """A batch to score ``rows`` with, and what is needed to read its outputs back (offsets, word ids)."""
        return self.collate(rows, tokenizer, max_length), None

    # --- predictions and metrics ------------------------------------------------------------
    def predictions(self, outputs, batch: dict, meta, first_row: int) -> list:
        """One prediction per example of the batch (``first_row``: the first example's index)."""
        raise NotImplementedError

    def score(self, predictions: list, data) -> dict:
        """The task's metrics over ``data`` from every example's prediction."""
        raise NotImplementedError

    def evaluate(self, module, data, tokenizer, *, batch_size: int, max_length: int, reference=None, progress: bool = True, name: str = "") -> dict:
        """Metrics of ``module`` (a graph's module, in eval mode) on ``data``, plus ``loss`` where targets give one.

        ``reference``: the dense module, for tasks scored against it (embeddings).
        """
        predictions, loss_sum, units = [], 0.0, 0
        device = device_of(module)
        for start in tqdm(range(0, len(data), batch_size), desc=f"evaluate {name}", disable=not progress, leave=False):
            rows = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            batch, meta = self.eval_features(rows, tokenizer, max_length)
            outputs = module(**{k: v.to(device) for k, v in batch.items()})
            if outputs.get("loss") is not None:
                n = self.loss_units(batch)
                loss_sum += outputs["loss"].item() * n
                units += n
            predictions.extend(self.predictions(outputs, batch, meta, start))
        if not predictions:
            raise ValueError(f"evaluate: dataset {name!r} is empty")
        metrics = self.score(predictions, data)
        if units:
            metrics["loss"] = loss_sum / units
        return {**metrics, "examples": len(data)}

    def loss_units(self, batch: dict) -> int:
        """What the graph's loss averages over in ``batch``: rows, or labelled tokens."""
        return len(batch["input_ids"])

    # --- distributions, Fisher and distillation ------------------------------------------------
    def distributions(self, outputs, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's predictive distributions: ``[(log_probs (examples, positions, classes), valid (examples, positions))]``.

        One entry per output the task predicts (class logits; QA's start and end).
        """
        raise NotImplementedError

    def distillation_loss(self, student, teacher, batch: dict, temperature: float) -> torch.Tensor:
        """T^2 * KL(teacher_T || student_T) over the task's distributions, averaged over valid positions."""
        terms = []
        for (s, valid), (t, _) in zip(self.distributions_at(student, batch, temperature), self.distributions_at(teacher, batch, temperature)):
            kl = F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
            terms.append(kl[valid].mean())
        return temperature**2 * sum(terms) / len(terms)

    def distributions_at(self, outputs, batch: dict, temperature: float):
        """:meth:`distributions` of the outputs' logits divided by ``temperature``."""
        scaled = {k: (v / temperature if k.endswith("logits") else v) for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        return self.distributions(scaled, batch)

    def fisher_terms(self, outputs, batch: dict, teacher: list[torch.Tensor], samples: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Scalar terms whose per-example gradients, squared and summed, give the Fisher of ``outputs``' distributions
        weighted by the ``teacher``'s probabilities (K-prune's predictive score).

        One position per example and few classes: exactly, one term per class
        ``sum_x sqrt(p_y(x)) log q_y(x)``. Otherwise (tokens, answer positions, many
        classes) by sampling: ``samples`` terms ``sum_x sum_pos log q_{y}(x, pos) / sqrt(samples)``
        with ``y`` drawn from the teacher per position; their squared gradients average
        to the Fisher of each example's joint distribution (positions independent).
        """
        terms = []
        for (log_q, valid), p in zip(self.distributions(outputs, batch), teacher):
            p = p.to(log_q.device)
            if log_q.shape[1] == 1 and log_q.shape[2] <= self.exact_classes:
                weight = p[:, 0].sqrt() * valid[:, 0, None]
                terms.extend((weight[:, y] * log_q[:, 0, y]).sum() for y in range(log_q.shape[2]))
                continue
            flat = p.reshape(-1, p.shape[-1]).float().cpu()
            for _ in range(samples):
                y = torch.multinomial(flat.clamp_min(0), 1, generator=generator).view(p.shape[:2]).to(log_q.device)
                picked = log_q.gather(-1, y[..., None])[..., 0]
                terms.append((picked * valid).sum() / math.sqrt(samples))
        return terms

    def teacher_probabilities(self, outputs, batch: dict) -> list[torch.Tensor]:
        """The dense model's probabilities, as :meth:`fisher_terms` reads them (detached)."""
        return [log_p.detach().exp() for log_p, _ in self.distributions(outputs, batch)]


def device_of(module) -> torch.device:
    """Where ``module`` computes: its parameters' device, or its own ``device`` (an exported artefact's adapter)."""
    device = getattr(module, "device", None)
    return device if isinstance(device, torch.device) else next(module.parameters()).device


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean", normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings from token states: sentence-transformers' mean, CLS or max pooling over real tokens."""
    mask = attention_mask[..., None].to(hidden.dtype)
    if pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "max":
        out = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    else:
        out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(out, dim=-1) if normalize else out
