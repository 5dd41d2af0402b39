"""``question-answering``: extractive answers as in SQuAD, long contexts in overlapping windows.

Each question and context is tokenised as a pair, the context cut into windows of
``max_length`` tokens that overlap by ``stride = max_length // 4`` (HF's example uses
128 of 384). Training targets are the answer's first and last context tokens in the
window that holds it whole, or the [CLS] position (0) in a window that does not, as
HF's ``run_qa`` labels them. The predicted answer is the best raw
``start_logit + end_logit`` over every window, context tokens only, end >= start, at
most 30 sub-tokens; it is scored by SQuAD v1.1's exact match and F1.
"""

from __future__ import annotations

import torch

from .. import metrics
from ..task_data import QADataset
from .base import Task

MAX_ANSWER_TOKENS = 30


class QuestionAnswering(Task):
    name = "question-answering"
    head = "question_answering"
    main_metric = "f1"
    metrics = ("f1", "exact_match")
    targets = ("start_positions", "end_positions")
    dataset_type = QADataset

    def _encode(self, rows, tokenizer, max_length):
        encoded = tokenizer(
            [row["questions"] for row in rows], [row["contexts"] for row in rows], truncation="only_second",
            max_length=max_length, stride=max(1, max_length // 4), return_overflowing_tokens=True,
            return_offsets_mapping=True, padding="longest", return_tensors="pt",
        )
        owners = encoded.pop("overflow_to_sample_mapping").tolist()
        offsets = encoded.pop("offset_mapping")
        context = torch.tensor([[s == 1 for s in encoded.sequence_ids(i)] for i in range(len(owners))], dtype=torch.bool)
        starts, ends = [], []
        for i, owner in enumerate(owners):
            answer = rows[owner]["answers"]
            first = answer["answer_start"][0]
            span = _token_span(offsets[i], context[i], first, first + len(answer["text"][0]))
            starts.append(span[0])
            ends.append(span[1])
        batch = dict(encoded)
        batch["start_positions"] = torch.tensor(starts, dtype=torch.long)
        batch["end_positions"] = torch.tensor(ends, dtype=torch.long)
        return batch, {"owners": owners, "offsets": offsets, "context": context, "texts": [row["contexts"] for row in rows]}

    def collate(self, rows, tokenizer, max_length):
        return self._encode(rows, tokenizer, max_length)[0]

    def eval_features(self, rows, tokenizer, max_length):
        return self._encode(rows, tokenizer, max_length)

    def predictions(self, outputs, batch, meta, first_row):
        start_logits = outputs["start_logits"].detach().float().cpu()
        end_logits = outputs["end_logits"].detach().float().cpu()
        best: dict[int, tuple[float, str]] = {}
        for i, owner in enumerate(meta["owners"]):
            score, s, e = metrics.best_span(start_logits[i], end_logits[i], meta["context"][i], MAX_ANSWER_TOKENS)
            if s < 0:
                continue
            text = meta["texts"][owner][int(meta["offsets"][i, s, 0]) : int(meta["offsets"][i, e, 1])]
            if owner not in best or score > best[owner][0]:
                best[owner] = (score, text)
        return [{"answer": best.get(k, (float("-inf"), ""))[1], "score": best.get(k, (float("-inf"), ""))[0]} for k in range(len(meta["texts"]))]

    def score(self, predictions, data):
        return metrics.squad_metrics([p["answer"] for p in predictions], [a["text"] for a in data.answers])

    def distributions(self, outputs, batch):
        out = []
        for key in ("start_logits", "end_logits"):
            logits = outputs[key]
            # one position per example; its classes are the window's token positions
            out.append((torch.log_softmax(logits, -1)[:, None, :], torch.ones(len(logits), 1, dtype=torch.bool, device=logits.device)))
        return out


def _token_span(offsets: torch.Tensor, context: torch.Tensor, start_char: int, end_char: int) -> tuple[int, int]:
    """The first and last context tokens covering ``[start_char, end_char)``, or (0, 0) if the window does not hold it whole."""
    positions = context.nonzero().view(-1)
    if len(positions) == 0:
        return 0, 0
    first, last = int(positions[0]), int(positions[-1])
    if offsets[first, 0] > start_char or offsets[last, 1] < end_char:
        return 0, 0
    s = first
    while s <= last and offsets[s, 0] <= start_char:
        s += 1
    e = last
    while e >= first and offsets[e, 1] >= end_char:
        e -= 1
    return s - 1, e + 1
