"""The metrics reported per task, as pure functions of predictions and references.

Every metric is a fraction in [0, 1] (or [-1, 1] for correlations), never a
percentage: a "drop in points" is computed by the caller as 100 x difference.
Each function checks its input and raises ``ValueError`` naming itself and what
was wrong (length mismatch, empty input, bad shape); none of them asserts.

Only torch, numpy and the standard library are used; the definitions match the
usual references (scikit-learn, scipy, seqeval, the official SQuAD v1.1 script),
and the tests compare against those.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F


def _array(values, name: str, fn: str) -> np.ndarray:
    """``values`` (list, numpy array or tensor) as a numpy array, refused when empty."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        raise ValueError(f"{fn}: {name} is empty")
    return array


def _same_shape(a: np.ndarray, b: np.ndarray, ndim: int, fn: str) -> None:
    if a.ndim != ndim or a.shape != b.shape:
        raise ValueError(f"{fn}: expected predictions and labels of one {ndim}-D shape, got {a.shape} and {b.shape}")


def classification_metrics(predictions, labels, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro F1 of predicted class ids (take the argmax of logits first).

    Macro F1 is scikit-learn's ``f1_score(average="macro", zero_division=0)``: the
    mean F1 over the classes present in predictions or labels. ``num_labels`` only
    checks that ids lie in ``[0, num_labels)``; it does not add absent classes to
    the average, which would lower it and disagree with scikit-learn.

    >>> classification_metrics([0, 1, 1], [0, 1, 0])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
    """
    fn = "classification_metrics"
    p, y = _array(predictions, "predictions", fn), _array(labels, "labels", fn)
    _same_shape(p, y, 1, fn)
    if num_labels is not None:
        for name, ids in (("predictions", p), ("labels", y)):
            if ids.min() < 0 or ids.max() >= num_labels:
                raise ValueError(f"{fn}: {name} hold ids outside [0, {num_labels})")
    n = len(p)
    classes, index = np.unique(np.concatenate([p, y]), return_inverse=True)
    pi, yi = index[:n], index[n:]
    tp = np.bincount(pi[pi == yi], minlength=len(classes))
    # F1 = 2tp / (2tp + fp + fn) = 2tp / (predicted + true); both counts are > 0 for a present class.
    f1 = 2 * tp / (np.bincount(pi, minlength=len(classes)) + np.bincount(yi, minlength=len(classes)))
    return {"accuracy": float((p == y).mean()), "macro_f1": float(f1.mean())}


def multilabel_metrics(predictions, labels) -> dict[str, float]:
    """Micro F1 and subset accuracy of 0/1 matrices of shape (examples, labels).

    Micro F1 pools every (example, label) decision, as scikit-learn's
    ``f1_score(average="micro")``; it is 0.0 when nothing is predicted or true.
    Accuracy is the share of rows predicted exactly right.

    >>> multilabel_metrics([[1, 0], [1, 1]], [[1, 0], [0, 1]])
    {'micro_f1': 0.8, 'accuracy': 0.5}
    """
    fn = "multilabel_metrics"
    p, y = _array(predictions, "predictions", fn), _array(labels, "labels", fn)
    _same_shape(p, y, 2, fn)
    for name, m in (("predictions", p), ("labels", y)):
        if not np.isin(m, (0, 1)).all():
            raise ValueError(f"{fn}: {name} must hold only 0 and 1")
    p, y = p.astype(bool), y.astype(bool)
    tp = int((p & y).sum())
    denominator = int(p.sum()) + int(y.sum())
    return {"micro_f1": 2 * tp / denominator if denominator else 0.0,
            "accuracy": float((p == y).all(axis=1).mean())}


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy's ``rankdata``)."""
    order = np.argsort(x, kind="stable")
    inverse = np.empty(len(x), dtype=np.int64)
    inverse[order] = np.arange(len(x))
    sorted_x = x[order]
    new_value = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(new_value)[inverse]  # 1-based index of each value's tie group
    bounds = np.r_[np.flatnonzero(new_value), len(x)]  # group g spans sorted positions [bounds[g-1], bounds[g])
    return 0.5 * (bounds[group - 1] + 1 + bounds[group])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    scale = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    # A constant side has no variance, so correlation is undefined (scipy gives nan);
    # 0.0 ("no linear relation found") keeps averages and "drops" finite.
    if scale == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float((x * y).sum()) / scale))


def regression_metrics(predictions, labels) -> dict[str, float]:
    """Pearson and Spearman correlation (STS-B style), in [-1, 1].

    Spearman is Pearson on average ranks, as ``scipy.stats.spearmanr``. Where
    either side is constant the correlation is undefined (scipy returns nan);
    here it is 0.0, so that a collapsed model scores "no correlation" and the
    result can still be averaged and compared.

    >>> regression_metrics([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])["spearman"]
    1.0
    """
    fn = "regression_metrics"
    x = _array(predictions, "predictions", fn).astype(np.float64)
    y = _array(labels, "labels", fn).astype(np.float64)
    _same_shape(x, y, 1, fn)
    if len(x) < 2:
        raise ValueError(f"{fn}: need at least 2 examples, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{fn}: inputs must be finite (found nan or inf)")
    return {"pearson": _pearson(x, y), "spearman": _pearson(_average_ranks(x), _average_ranks(y))}


def _split_tag(tag: str) -> tuple[str, str]:
    """(prefix letter, entity type) as seqeval reads a tag: 'B-PER' -> ('B', 'PER'), 'O' -> ('O', '_')."""
    if not tag:
        raise ValueError("entity_metrics: found an empty tag string")
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunks(sentences: list[list[str]]) -> set[tuple[str, int, int]]:
    """Every entity (type, start, end) of the sentences, conlleval-style as seqeval's ``get_entities``.

    The sentences are joined with an 'O' after each, exactly as seqeval does, so
    no entity crosses a sentence boundary and the offsets are positions in the join.
    """
    flat = [tag for sentence in sentences for tag in [*sentence, "O"]]
    chunks, prev_tag, prev_type, begin = set(), "O", "", 0
    for i, tag_string in enumerate(flat + ["O"]):
        tag, type_ = _split_tag(tag_string)
        # A chunk ends after E or S, before B, S or O, and wherever the type changes.
        ends = (prev_tag in "ES" or (prev_tag in "BI" and tag in "BSO")
                or (prev_tag not in "O." and prev_type != type_))
        # A chunk starts at B or S, at E or I that follow O, E or S (conlleval's
        # lenient reading of I- after O), and wherever the type changes.
        starts = (tag in "BS" or (prev_tag in "OES" and tag in "EI")
                  or (tag not in "O." and prev_type != type_))
        if ends:
            chunks.add((prev_type, begin, i - 1))
        if starts:
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def entity_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 of IOB2 tag sequences (NER).

    The numbers are seqeval's ``precision_score``, ``recall_score`` and
    ``f1_score`` in their default (conlleval-compatible, not ``mode="strict"``)
    mode: an I-X after O or after another type opens a new entity. A metric whose
    denominator is 0 is 0.0 (seqeval's default, less its warning).

    >>> entity_metrics([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]])
    {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
    """
    fn = "entity_metrics"
    if len(true_tags) == 0:
        raise ValueError(f"{fn}: no sentences given")
    if len(true_tags) != len(predicted_tags):
        raise ValueError(f"{fn}: {len(true_tags)} true sentences but {len(predicted_tags)} predicted")
    for i, (t, p) in enumerate(zip(true_tags, predicted_tags)):
        if isinstance(t, str) or isinstance(p, str):
            raise ValueError(f"{fn}: sentence {i} is a string; pass lists of tag lists")
        if len(t) != len(p):
            raise ValueError(f"{fn}: sentence {i} has {len(t)} true tags but {len(p)} predicted")
    true, predicted = _chunks(true_tags), _chunks(predicted_tags)
    correct = len(true & predicted)
    precision = correct / len(predicted) if predicted else 0.0
    recall = correct / len(true) if true else 0.0
    # F1 from precision and recall, as seqeval computes it, so the floats agree.
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's normalisation: lower case, drop punctuation, drop a/an/the, collapse spaces.

    The order is the official script's; punctuation goes before articles, so
    "the-end" becomes "theend" and keeps its letters.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    """
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised answers are equal, else 0.0.

    >>> exact_match("the Eiffel tower", "Eiffel Tower.")
    1.0
    """
    return float(normalize_answer(prediction) == normalize_answer(gold))


def answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised answers, as the official SQuAD v1.1 script.

    Shared tokens are counted with multiplicity; no shared token (including an
    empty answer on either side) gives 0.0.

    >>> answer_f1("in Paris France", "Paris")  # precision 1/3, recall 1/1
    0.5
    """
    predicted, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], gold_answers: list[list[str]]) -> dict[str, float]:
    """Mean over examples of the best exact match and F1 against any gold answer.

    >>> squad_metrics(["Paris"], [["paris", "Paris, France"]])
    {'exact_match': 1.0, 'f1': 1.0}
    """
    fn = "squad_metrics"
    if len(predictions) == 0:
        raise ValueError(f"{fn}: no predictions given")
    if len(predictions) != len(gold_answers):
        raise ValueError(f"{fn}: {len(predictions)} predictions but {len(gold_answers)} gold answer lists")
    em = f1 = 0.0
    for i, (prediction, golds) in enumerate(zip(predictions, gold_answers)):
        if isinstance(golds, str) or len(golds) == 0:
            raise ValueError(f"{fn}: example {i} needs a non-empty list of gold answers")
        em += max(exact_match(prediction, g) for g in golds)
        f1 += max(answer_f1(prediction, g) for g in golds)
    return {"exact_match": em / len(predictions), "f1": f1 / len(predictions)}


def best_span(start_logits: torch.Tensor, end_logits: torch.Tensor, allowed: torch.Tensor,
              max_answer_tokens: int = 30) -> tuple[float, int, int]:
    """The best answer span of one window: max of ``start_logits[s] + end_logits[e]``.

    Both ``s`` and ``e`` must be ``allowed`` (context tokens) and
    ``s <= e < s + max_answer_tokens``. Returns ``(score, s, e)``, with the first
    such pair in (s, e) order on ties, or ``(-inf, -1, -1)`` if no span is allowed.

    >>> best_span(torch.tensor([0., 2., 1.]), torch.tensor([0., 1., 3.]), torch.tensor([False, True, True]))
    (5.0, 1, 2)
    """
    fn = "best_span"
    if start_logits.ndim != 1 or start_logits.shape != end_logits.shape or start_logits.shape != allowed.shape:
        raise ValueError(f"{fn}: expected 1-D tensors of one length, got shapes "
                         f"{tuple(start_logits.shape)}, {tuple(end_logits.shape)}, {tuple(allowed.shape)}")
    if allowed.dtype != torch.bool:
        raise ValueError(f"{fn}: allowed must be a bool tensor, got {allowed.dtype}")
    if max_answer_tokens < 1:
        raise ValueError(f"{fn}: max_answer_tokens must be >= 1, got {max_answer_tokens}")
    n = start_logits.shape[0]
    scores = start_logits[:, None] + end_logits[None, :]  # scores[s, e]
    offset = torch.arange(n, device=allowed.device)
    length = offset[None, :] - offset[:, None]  # e - s
    valid = (length >= 0) & (length < max_answer_tokens) & allowed[:, None] & allowed[None, :]
    if not valid.any():
        return float("-inf"), -1, -1
    best = int(scores.masked_fill(~valid, float("-inf")).flatten().argmax())
    return float(scores.flatten()[best]), best // n, best % n


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # At least float32, so half-precision embeddings do not lose the ranking to rounding.
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


def _embeddings(a, b, fn: str, names: tuple[str, str]) -> None:
    for name, x in zip(names, (a, b)):
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{fn}: {name} must be a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: {names[0]} have dimension {a.shape[1]} but {names[1]} {b.shape[1]}")


def retrieval_metrics(query_embeddings: torch.Tensor, document_embeddings: torch.Tensor,
                      ks=(1, 10), mrr_at: int = 10, chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k and MRR@``mrr_at`` when query i's one relevant document is document i.

    Similarity is cosine. Documents beyond the number of queries are distractors.
    A query's rank is 1 + the number of documents scoring strictly higher than its
    own, so ties count in the query's favour. Queries go ``chunk_size`` at a time,
    so memory is ``chunk_size x documents`` scores, not queries x documents.

    >>> retrieval_metrics(torch.tensor([[1., 0.], [1., 0.1]]), torch.eye(2))  # query 1 prefers document 0
    {'recall@1': 0.5, 'recall@10': 1.0, 'mrr@10': 0.75}
    """
    fn = "retrieval_metrics"
    _embeddings(query_embeddings, document_embeddings, fn, ("queries", "documents"))
    n = query_embeddings.shape[0]
    if document_embeddings.shape[0] < n:
        raise ValueError(f"{fn}: {n} queries but only {document_embeddings.shape[0]} documents")
    if chunk_size < 1 or mrr_at < 1 or any(k < 1 for k in ks):
        raise ValueError(f"{fn}: chunk_size, mrr_at and every k must be >= 1")
    queries, documents = _unit_rows(query_embeddings), _unit_rows(document_embeddings)
    ranks = []
    for start in range(0, n, chunk_size):
        scores = queries[start:start + chunk_size] @ documents.T
        rows = torch.arange(scores.shape[0], device=scores.device)
        # The relevant score is read from the same matrix, so its own entry is never "strictly higher".
        own = scores[rows, start + rows]
        ranks.append(1 + (scores > own[:, None]).sum(dim=1))
    rank = torch.cat(ranks).double()
    metrics = {f"recall@{k}": float((rank <= k).double().mean()) for k in ks}
    metrics[f"mrr@{mrr_at}"] = float(torch.where(rank <= mrr_at, 1.0 / rank, 0.0).mean())
    return metrics


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of row i of ``a`` and row i of ``b``.

    A zero row has cosine 0 with anything.

    >>> mean_cosine(torch.tensor([[1., 0.], [0., 1.]]), torch.tensor([[2., 0.], [1., 0.]]))
    0.5
    """
    fn = "mean_cosine"
    _embeddings(a, b, fn, ("a", "b"))
    if a.shape != b.shape:
        raise ValueError(f"{fn}: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    return float((_unit_rows(a) * _unit_rows(b)).sum(dim=1).mean())
