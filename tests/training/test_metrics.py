"""The task metrics against independent oracles.

scikit-learn, scipy and seqeval are the references where they exist; brute-force
loops written here are the reference for span search, retrieval and cosine; the
SQuAD cases are computed by hand. Each oracle comparison also checks that a
plausible wrong variant gives a different number on the same data, so agreement
means something.
"""

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from seqeval import metrics as seqeval
from seqeval.scheme import IOB2
from sklearn import metrics as sk

from graphprune.training.metrics import (
    answer_f1,
    best_span,
    classification_metrics,
    entity_metrics,
    exact_match,
    mean_cosine,
    multilabel_metrics,
    normalize_answer,
    regression_metrics,
    retrieval_metrics,
    squad_metrics,
)


# ---------------------------------------------------------------- classification

def test_classification_matches_sklearn():
    rng = np.random.default_rng(0)
    differs_from_all_class_macro = False
    for trial in range(100):
        n, k = int(rng.integers(1, 40)), int(rng.integers(2, 7))
        labels = rng.integers(0, k, n)
        # Some trials draw predictions from fewer classes, so classes go missing on one side.
        predictions = rng.integers(0, k if trial % 2 else 2, n)
        got = classification_metrics(predictions.tolist(), torch.as_tensor(labels), num_labels=k)
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions))
        assert got["macro_f1"] == pytest.approx(sk.f1_score(labels, predictions, average="macro", zero_division=0))
        wrong = sk.f1_score(labels, predictions, average="macro", labels=range(k), zero_division=0)
        differs_from_all_class_macro |= wrong != pytest.approx(got["macro_f1"])
    assert differs_from_all_class_macro  # averaging over absent classes would have been caught


def test_classification_by_hand():
    # labels 0 0 1 2, predictions 0 1 1 1: accuracy 2/4.
    # class 0: tp 1, predicted 1, true 2 -> F1 2*1/(1+2) = 2/3
    # class 1: tp 1, predicted 3, true 1 -> F1 2*1/(3+1) = 1/2
    # class 2: tp 0                      -> F1 0;  macro = (2/3 + 1/2 + 0) / 3 = 7/18
    got = classification_metrics([0, 1, 1, 1], [0, 0, 1, 2])
    assert got == pytest.approx({"accuracy": 0.5, "macro_f1": 7 / 18})


@pytest.mark.parametrize("predictions, labels, kwargs, message", [
    ([0, 1], [0], {}, "shape"),
    ([], [], {}, "empty"),
    ([[0, 1]], [[0, 1]], {}, "1-D"),
    ([0, 3], [0, 1], {"num_labels": 3}, "outside"),
])
def test_classification_rejects_bad_input(predictions, labels, kwargs, message):
    with pytest.raises(ValueError, match=f"classification_metrics.*{message}"):
        classification_metrics(predictions, labels, **kwargs)


# ---------------------------------------------------------------- multilabel

def test_multilabel_matches_sklearn():
    rng = np.random.default_rng(1)
    differs_from_hamming = False
    for _ in range(60):
        # at least 2 columns: scikit-learn reads a single column as binary class ids, not as one label
        shape = (int(rng.integers(1, 20)), int(rng.integers(2, 6)))
        labels = (rng.random(shape) < 0.3).astype(int)
        predictions = np.where(rng.random(shape) < 0.2, 1 - labels, labels)
        got = multilabel_metrics(torch.as_tensor(predictions), labels.tolist())
        assert got["micro_f1"] == pytest.approx(sk.f1_score(labels, predictions, average="micro", zero_division=0))
        assert got["accuracy"] == pytest.approx(sk.accuracy_score(labels, predictions))
        differs_from_hamming |= got["accuracy"] != pytest.approx((labels == predictions).mean())
    assert differs_from_hamming  # per-cell accuracy instead of subset accuracy would have been caught


def test_multilabel_by_hand_and_nothing_positive():
    # cells: tp at (0,0) and (1,1); fp at (1,0); fn at (2,1) -> micro F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    # rows right: row 0 only -> accuracy 1/3
    got = multilabel_metrics([[1, 0], [1, 1], [0, 0]], [[1, 0], [0, 1], [0, 1]])
    assert got == pytest.approx({"micro_f1": 2 / 3, "accuracy": 1 / 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert multilabel_metrics([[0, 0]], [[0, 0]]) == {"micro_f1": 0.0, "accuracy": 1.0}


def test_multilabel_rejects_bad_input():
    with pytest.raises(ValueError, match="multilabel_metrics.*shape"):
        multilabel_metrics([[0, 1]], [[0, 1, 1]])
    with pytest.raises(ValueError, match="multilabel_metrics.*0 and 1"):
        multilabel_metrics([[0, 2]], [[0, 1]])
    with pytest.raises(ValueError, match="multilabel_metrics.*empty"):
        multilabel_metrics([], [])


# ---------------------------------------------------------------- regression

def test_regression_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    differs_from_ordinal_ranks = False
    for _ in range(60):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 6, n).astype(float)  # few values: many ties
        predictions = labels + rng.integers(-2, 3, n)
        if np.ptp(labels) == 0 or np.ptp(predictions) == 0:
            continue
        got = regression_metrics(predictions, torch.as_tensor(labels))
        assert got["pearson"] == pytest.approx(stats.pearsonr(predictions, labels)[0])
        assert got["spearman"] == pytest.approx(stats.spearmanr(predictions, labels)[0])
        ordinal = stats.pearsonr(stats.rankdata(predictions, "ordinal"), stats.rankdata(labels, "ordinal"))[0]
        differs_from_ordinal_ranks |= ordinal != pytest.approx(got["spearman"])
    assert differs_from_ordinal_ranks  # ranking ties arbitrarily would have been caught


def test_regression_constant_input_is_zero():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(stats.spearmanr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0])  # why we chose a value
    assert regression_metrics([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_regression_rejects_bad_input():
    for predictions, labels, message in [([1.0, 2.0], [1.0], "shape"), ([1.0], [2.0], "at least 2"),
                                         ([], [], "empty"), ([1.0, float("nan")], [1.0, 2.0], "finite")]:
        with pytest.raises(ValueError, match=f"regression_metrics.*{message}"):
            regression_metrics(predictions, labels)


# ---------------------------------------------------------------- entities (seqeval)

TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]
ODD_TAGS = ["E-PER", "S-LOC", "B", "I", "E", "S", "PER", "I-MISC-X"]


def random_sentences(rng: random.Random, odd: bool) -> tuple[list, list]:
    pool = TAGS + ODD_TAGS if odd else TAGS
    true, predicted = [], []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(0, 10)
        sentence = [rng.choice(pool) for _ in range(n)]
        mode = rng.random()
        if mode < 0.1:
            guess = ["O"] * n  # predicts nothing
        elif mode < 0.5:
            guess = [t if rng.random() < 0.8 else rng.choice(pool) for t in sentence]  # near miss
        else:
            guess = [rng.choice(pool) for _ in range(n)]
        true.append(sentence)
        predicted.append(guess)
    return true, predicted


def seqeval_scores(true, predicted, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on zero division and on odd tags
        return {"precision": seqeval.precision_score(true, predicted, **kwargs),
                "recall": seqeval.recall_score(true, predicted, **kwargs),
                "f1": seqeval.f1_score(true, predicted, **kwargs)}


@pytest.mark.parametrize("odd", [False, True], ids=["iob2", "odd-tags"])
def test_entities_match_seqeval(odd):
    rng = random.Random(3)
    differs_from_strict = False
    for _ in range(300):
        true, predicted = random_sentences(rng, odd)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # our version stays silent
            got = entity_metrics(true, predicted)
        assert got == pytest.approx(seqeval_scores(true, predicted)), (true, predicted)
        if not odd:
            strict = seqeval_scores(true, predicted, mode="strict", scheme=IOB2)
            differs_from_strict |= strict != pytest.approx(got)
    if not odd:
        assert differs_from_strict  # strict IOB2 parsing would have been caught


def test_entities_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "I-ORG", "I-ORG"]]
    # true entities: PER(0-1), LOC(3), ORG(1-2 of sentence 2; I- after O opens one) -> 3
    predicted = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "B-ORG", "I-LOC"]]
    # predicted: PER(0-1) right, LOC(3) right (I- after O), ORG(1) wrong end, LOC(2) wrong -> 4
    # precision 2/4, recall 2/3, F1 = 2 * 1/2 * 2/3 / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert entity_metrics(true, predicted) == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7})
    # A type switch inside a run splits it: B-PER I-LOC is PER(0) + LOC(1), so B-PER I-PER is missed.
    assert entity_metrics([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # Nothing true and nothing predicted: every denominator is 0 -> 0.0, as seqeval's default.
    assert entity_metrics([["O", "O"], []], [["O", "O"], []]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # Entities never cross sentences: a trailing I-PER and a leading I-PER are two entities.
    assert entity_metrics([["I-PER"], ["I-PER"]], [["I-PER"], ["I-PER"]])["f1"] == 1.0


def test_entities_reject_bad_input():
    for true, predicted, message in [([], [], "no sentences"), ([["O"]], [["O"], ["O"]], "1 true sentences"),
                                     ([["O", "O"]], [["O"]], "sentence 0"), (["O"], ["O"], "string")]:
        with pytest.raises(ValueError, match=f"entity_metrics.*{message}"):
            entity_metrics(true, predicted)


# ---------------------------------------------------------------- SQuAD

def test_normalize_answer_order():
    assert normalize_answer("  The Quick,  brown FOX. ") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    # Punctuation goes before articles: "the-end" -> "theend", which is not an article.
    assert normalize_answer("the-end") == "theend"
    assert normalize_answer("theatre") == "theatre"  # "the" only as a whole word


def test_squad_by_hand():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # "the big red barn" -> [big, red, barn]; "a red barn" -> [red, barn]: 2 shared
    # precision 2/3, recall 2/2 -> F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 4/5
    assert answer_f1("the big red barn", "a red barn") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: [red, red] vs [red]: 1 shared,
    # precision 1/2, recall 1/1 -> F1 = 1 / (3/2) = 2/3
    assert answer_f1("red red", "red") == pytest.approx(2 / 3)
    # [red, red] vs [red, red, blue]: 2 shared (a set would count 1),
    # precision 2/2, recall 2/3 -> F1 = 2 * (2/3) / (5/3) = 4/5
    assert answer_f1("red red", "red red blue") == pytest.approx(0.8)
    assert answer_f1("", "red") == 0.0
    predictions = ["Denver Broncos", "in 1990", "", "the cat"]
    gold = [["Denver Broncos", "Broncos"],   # EM 1, F1 1
            ["1989", "in the year 1990"],    # EM 0; vs [in, year, 1990]: 2 shared, p 2/2, r 2/3 -> F1 4/5
            ["Paris"],                       # empty prediction: EM 0, F1 0
            ["cat.", "a dog"]]               # "cat" == "cat": EM 1, F1 1
    # EM = (1 + 0 + 0 + 1) / 4 = 1/2;  F1 = (1 + 4/5 + 0 + 1) / 4 = 2.8 / 4 = 0.7
    assert squad_metrics(predictions, gold) == pytest.approx({"exact_match": 0.5, "f1": 0.7})


def test_squad_rejects_bad_input():
    for predictions, gold, message in [([], [], "no predictions"), (["a"], [["a"], ["b"]], "1 predictions"),
                                       (["a"], [[]], "non-empty"), (["a"], ["a"], "non-empty")]:
        with pytest.raises(ValueError, match=f"squad_metrics.*{message}"):
            squad_metrics(predictions, gold)


# ---------------------------------------------------------------- answer spans

def brute_force_span(start, end, allowed, max_answer_tokens):
    best = (float("-inf"), -1, -1)
    for s in range(len(start)):
        for e in range(s, min(s + max_answer_tokens, len(start))):
            if allowed[s] and allowed[e] and float(start[s] + end[e]) > best[0]:
                best = (float(start[s] + end[e]), s, e)
    return best


def test_best_span_matches_brute_force():
    generator = torch.Generator().manual_seed(4)
    for trial in range(150):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        start, end = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
        allowed = torch.rand(n, generator=generator) < (0.0 if trial % 10 == 0 else 0.6)
        max_answer_tokens = int(torch.randint(1, 12, (1,), generator=generator))
        got = best_span(start, end, allowed, max_answer_tokens)
        expected = brute_force_span(start, end, allowed, max_answer_tokens)
        assert got[1:] == expected[1:] and got[0] == pytest.approx(expected[0])
        assert isinstance(got[0], float) and isinstance(got[1], int)
    assert best_span(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)) == (float("-inf"), -1, -1)


def test_best_span_respects_order_and_length():
    start, end = torch.tensor([0.0, 0.0, 9.0, 0.0]), torch.tensor([5.0, 0.0, 0.0, 1.0])
    allowed = torch.ones(4, dtype=torch.bool)
    # end 0 is best alone but lies before start 2; best legal is 9 + 1 at (2, 3)
    assert best_span(start, end, allowed) == (10.0, 2, 3)
    # one-token answers only: (2, 2) scores 9
    assert best_span(start, end, allowed, max_answer_tokens=1) == (9.0, 2, 2)
    with pytest.raises(ValueError, match="best_span.*1-D"):
        best_span(start, end[:3], allowed)
    with pytest.raises(ValueError, match="best_span.*bool"):
        best_span(start, end, allowed.int())
    with pytest.raises(ValueError, match="best_span.*max_answer_tokens"):
        best_span(start, end, allowed, max_answer_tokens=0)


# ---------------------------------------------------------------- retrieval and cosine

def brute_force_retrieval(queries: np.ndarray, documents: np.ndarray):
    recall1 = recall10 = mrr = 0.0
    for i, q in enumerate(queries):
        scores = [float(q @ d / (np.linalg.norm(q) * np.linalg.norm(d))) for d in documents]
        rank = 1 + sum(score > scores[i] for score in scores)
        recall1 += rank <= 1
        recall10 += rank <= 10
        mrr += 1 / rank if rank <= 10 else 0.0
    n = len(queries)
    return {"recall@1": recall1 / n, "recall@10": recall10 / n, "mrr@10": mrr / n}


def test_retrieval_matches_brute_force():
    generator = torch.Generator().manual_seed(5)
    queries = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    # documents near their queries, plus 20 distractors
    documents = torch.cat([queries + 1.2 * torch.randn(60, 8, generator=generator, dtype=torch.float64),
                           torch.randn(20, 8, generator=generator, dtype=torch.float64)])
    expected = brute_force_retrieval(queries.numpy(), documents.numpy())
    assert 0 < expected["recall@1"] < expected["recall@10"] < 1  # a spread of ranks, not a trivial case
    for chunk_size in (1, 7, 1000):
        assert retrieval_metrics(queries, documents, chunk_size=chunk_size) == pytest.approx(expected)
    got = retrieval_metrics(queries.float(), documents.float(), ks=(1, 5), mrr_at=3)
    assert set(got) == {"recall@1", "recall@5", "mrr@3"}


def test_retrieval_by_hand_with_ties():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    documents = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 1.0]])
    # query 0: scores 1, 1, -0.71 -> its own document ties document 1: rank 1 + 0 higher = 1
    # query 1: scores 0, 0, 0.71  -> one strictly higher: rank 2
    # query 2: scores 0.71, 0.71, 0 -> two strictly higher: rank 3
    # recall@1 = 1/3, recall@2 = 2/3, MRR@10 = (1 + 1/2 + 1/3) / 3 = 11/18
    got = retrieval_metrics(queries, documents, ks=(1, 2))
    assert got == pytest.approx({"recall@1": 1 / 3, "recall@2": 2 / 3, "mrr@10": 11 / 18})
    # Counting ties against the query would make query 0 rank 2 and give recall@1 = 0.
    with pytest.raises(ValueError, match="retrieval_metrics.*only 2 documents"):
        retrieval_metrics(queries, documents[:2])
    with pytest.raises(ValueError, match="retrieval_metrics.*dimension"):
        retrieval_metrics(queries, torch.ones(3, 3))


def test_mean_cosine_matches_torch():
    generator = torch.Generator().manual_seed(6)
    a, b = torch.randn(50, 16, generator=generator), torch.randn(50, 16, generator=generator)
    b[:25] += 2 * a[:25]  # some rows close, some unrelated
    a[3] = 0.0  # a zero row has cosine 0 in both
    assert mean_cosine(a, b) == pytest.approx(float(F.cosine_similarity(a, b, dim=1).mean()), abs=1e-6)
    assert mean_cosine(a, a) != pytest.approx(1.0)  # the zero row counts, as 0
    with pytest.raises(ValueError, match="mean_cosine.*shapes differ"):
        mean_cosine(a, b[:10])
    with pytest.raises(ValueError, match="mean_cosine.*non-empty"):
        mean_cosine(torch.ones(0, 2), torch.ones(0, 2))
