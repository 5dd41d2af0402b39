"""Users' own data files: every format, task and label rule, and one clear error per kind of bad data."""

import csv
import json
import re
import tempfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from graphprune.training.data import TextDataset
from graphprune.training.task_data import EmbeddingDataset, QADataset, TokenDataset
from graphprune.training.user_data import load_data


@pytest.fixture(autouse=True)
def hf_dirs(tmp_path, monkeypatch):
    """Point every HF cache and the temp folder at tmp_path, so a test can see whether reading leaves files behind."""
    dirs = {name: tmp_path / name for name in ("hf_home", "hf_datasets", "scratch")}
    dirs["scratch"].mkdir()
    monkeypatch.setenv("HF_HOME", str(dirs["hf_home"]))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(dirs["hf_datasets"]))
    monkeypatch.setattr(datasets.config, "HF_CACHE_HOME", str(dirs["hf_home"]))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", dirs["hf_datasets"])
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", dirs["hf_datasets"] / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", dirs["hf_datasets"] / "downloads" / "extracted")
    monkeypatch.setattr(tempfile, "tempdir", str(dirs["scratch"]))
    return dirs


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path, records):
    Path(path).write_text(json.dumps(records), encoding="utf-8")
    return path


def load(task, **kwargs):
    logs = []
    data = load_data(task, log=logs.append, **kwargs)
    return data, logs


def error(task, exception=ValueError, **kwargs) -> str:
    with pytest.raises(exception) as raised:
        load_data(task, log=lambda _: None, **kwargs)
    return str(raised.value)


def reviews(n, offset=0):
    return [(f"review {i + offset}", "positive" if i % 3 else "negative", f"film{(i + offset) // 4}") for i in range(n)]


# --- formats ---------------------------------------------------------------------------------------------------------

def test_csv_with_own_column_names_maps_string_labels_to_the_models_ids(tmp_path):
    rows = reviews(12)
    train = write_csv(tmp_path / "train.csv", ["review", "sentiment", "film"], rows)
    val = write_csv(tmp_path / "val.csv", ["review", "sentiment", "film"], reviews(4, 100))
    test = write_csv(tmp_path / "test.csv", ["review", "sentiment", "film"], reviews(5, 200))
    model = ("positive", "negative")  # not sorted: the model's order decides the ids
    data, _ = load("text-classification", train=train, validation=val, test=test, model_label_names=model,
                   columns={"text": "review", "label": "sentiment"})
    assert data.label_names == model and data.problem == "single_label"
    assert data.splits["train"].texts == [r[0] for r in rows]
    assert data.splits["train"].labels == [model.index(r[1]) for r in rows]
    assert len(data.splits["validation"]) == 4 and len(data.splits["test"]) == 5
    assert data.files == {"train": str(train), "validation": str(val), "test": str(test)}
    assert data.overlaps == {"train/validation": 0, "train/test": 0, "validation/test": 0}
    assert isinstance(data.splits["test"], TextDataset) and data.splits["test"].pairs is None


def test_tsv_keeps_commas_quotes_and_NA_as_text(tmp_path):
    rows = [('fine, "mostly"', "b"), ("NA", "a"), ("null", "b")]
    path = write_csv(tmp_path / "d.tsv", ["text", "label"], rows, delimiter="\t")
    data, _ = load("text-classification", train=path, validation=path, test=path)
    assert data.splits["train"].texts == [r[0] for r in rows]
    assert data.splits["train"].labels == [1, 0, 1]


@pytest.mark.parametrize("writer, name", [(write_json, "d.json"), (write_jsonl, "d.json"), (write_jsonl, "d.jsonl")])
def test_json_array_and_json_lines(tmp_path, writer, name):
    records = [{"sentence": f"s{i}", "y": i % 2} for i in range(6)]
    path = writer(tmp_path / name, records)
    data, _ = load("text-classification", train=path, validation=path, test=path, columns={"text": "sentence", "label": "y"})
    assert data.splits["validation"].texts == [r["sentence"] for r in records]
    assert data.splits["validation"].labels == [r["y"] for r in records]
    assert data.label_names == ("0", "1")  # integer labels, no head, no names: "0", "1", ...


def test_parquet(tmp_path):
    records = [{"text": f"t{i}", "label": ["x", "y", "z"][i % 3]} for i in range(9)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    data, _ = load("text-classification", train=path, validation=path, test=path, label_names=["z", "y", "x"])
    assert data.splits["train"].labels == [["z", "y", "x"].index(r["label"]) for r in records]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    rows = {"text": ["a", "b", "c"], "label": [0, 1, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    dd = datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), validation=datasets.Dataset.from_dict({"text": ["d"], "label": [0]}))
    dd.save_to_disk(tmp_path / "dict")
    data, _ = load("text-classification", train=tmp_path / "dict", validation=tmp_path / "dict", test=tmp_path / "one")
    assert data.splits["train"].texts == ["a", "b", "c"] and data.splits["validation"].texts == ["d"]
    assert data.splits["test"].labels == [0, 1, 1]
    message = error("text-classification", train=tmp_path / "dict", validation=tmp_path / "dict", test=tmp_path / "dict")
    assert "'test'" in message and "train, validation" in message


def test_nothing_is_left_in_the_caches_or_temp_folder(tmp_path, hf_dirs):
    records = [{"text": f"t{i}", "label": i % 2} for i in range(4)]
    paths = [write_csv(tmp_path / "a.csv", ["text", "label"], [(r["text"], r["label"]) for r in records]),
             write_csv(tmp_path / "a.tsv", ["text", "label"], [(r["text"], r["label"]) for r in records], "\t"),
             write_json(tmp_path / "a.json", records), write_jsonl(tmp_path / "a.jsonl", records)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    datasets.Dataset.from_list(records).save_to_disk(tmp_path / "folder")
    for path in paths + [tmp_path / "a.parquet", tmp_path / "folder"]:
        load("text-classification", train=path, validation=path, test=path)
    with pytest.raises(ValueError):
        load("text-classification", train=write_csv(tmp_path / "h.csv", ["text", "label"], []))
    for folder in hf_dirs.values():
        assert not folder.exists() or not any(folder.rglob("*")), sorted(folder.rglob("*"))


# --- text classification: pairs, multi-label, regression, label names -------------------------------------------------

def test_sentence_pairs(tmp_path):
    rows = [(f"premise {i}", f"hypothesis {i}", ["entailment", "contradiction"][i % 2]) for i in range(4)]
    path = write_csv(tmp_path / "nli.csv", ["a", "b", "gold"], rows)
    data, _ = load("text-classification", train=path, validation=path, test=path,
                   columns={"text": "a", "text_pair": "b", "label": "gold"}, label_names=["entailment", "contradiction"])
    train = data.splits["train"]
    assert train.pairs == [r[1] for r in rows] and train[1] == ("premise 1", 1, "hypothesis 1")


def test_multi_label_lists_json_and_csv(tmp_path):
    labels = [["sports"], ["tech", "politics"], [], ["politics"]]
    names = sorted({x for row in labels for x in row})
    oracle = [[1.0 if n in row else 0.0 for n in names] for row in labels]
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"text": f"t{i}", "label": row} for i, row in enumerate(labels)])
    data, _ = load("text-classification", train=jsonl, validation=jsonl, test=jsonl)
    assert data.problem == "multi_label" and data.label_names == tuple(names)
    assert data.splits["train"].labels == oracle
    csv_file = write_csv(tmp_path / "m.csv", ["text", "label"], [(f"t{i}", json.dumps(row)) for i, row in enumerate(labels)])
    data, _ = load("text-classification", train=csv_file, validation=csv_file, test=csv_file)
    assert data.splits["test"].labels == oracle
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"text": "a", "label": [2, 0]}, {"text": "b", "label": [1]}])
    data, _ = load("text-classification", train=ids, validation=ids, test=ids, label_names=["x", "y", "z"])
    assert data.splits["train"].labels == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]] and data.label_names == ("x", "y", "z")


def test_regression_floats_including_whole_ones(tmp_path):
    scores = [0.5, 1, 4.25, 3]  # datasets reads the column as floats: all regression targets
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": f"t{i}", "label": s} for i, s in enumerate(scores)])
    data, _ = load("text-classification", train=path, validation=path, test=path)
    assert data.problem == "regression" and data.label_names == ()
    assert data.splits["train"].labels == [float(s) for s in scores]
    assert all(isinstance(v, float) for v in data.splits["train"].labels)
    assert "regression" in error("text-classification", train=path, label_names=["low", "high"])


def test_label_names_without_a_head(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [("a", "zeta"), ("b", "alpha"), ("c", "mid")])
    data, _ = load("text-classification", train=path, validation=path, test=path)
    assert data.label_names == ("alpha", "mid", "zeta") and data.splits["train"].labels == [2, 0, 1]
    data, _ = load("text-classification", train=path, validation=path, test=path, label_names=["zeta", "mid", "alpha"],
                   model_label_names=("alpha", "mid", "zeta"))  # the job's list wins over the model's
    assert data.splits["train"].labels == [0, 2, 1]
    ints = write_csv(tmp_path / "i.csv", ["text", "label"], [("a", 0), ("b", 3)])
    assert load("text-classification", train=ints, validation=ints, test=ints)[0].label_names == ("0", "1", "2", "3")
    data, _ = load("text-classification", train=ints, validation=ints, test=ints, model_label_names=("LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"))
    assert data.splits["train"].labels == [0, 3]


# --- other tasks -----------------------------------------------------------------------------------------------------

def test_token_classification_from_json_lines_without_a_head(tmp_path):
    records = [{"words": ["Ada", "Lovelace", "wrote"], "ner": ["B-PER", "I-PER", "O"]},
               {"words": ["in", "London"], "ner": ["O", "B-LOC"]}]
    path = write_jsonl(tmp_path / "ner.jsonl", records)
    data, _ = load("token-classification", train=path, validation=path, test=path, columns={"tokens": "words", "tags": "ner"})
    names = ("O", "B-LOC", "B-PER", "I-PER")  # "O" first, then sorted
    assert data.label_names == names and data.problem is None
    train = data.splits["train"]
    assert isinstance(train, TokenDataset) and train.words == [r["words"] for r in records]
    assert train.tags == [[names.index(t) for t in r["ner"]] for r in records]


def test_token_classification_from_csv_with_json_and_spaced_lists(tmp_path):
    model = ("O", "B-LOC", "I-LOC")
    rows = [(json.dumps(["New", "York", "1999"]), json.dumps(["B-LOC", "I-LOC", "O"])), ("in Paris", "O B-LOC")]
    path = write_csv(tmp_path / "ner.csv", ["tokens", "tags"], rows)
    data, _ = load("token-classification", train=path, validation=path, test=path, model_label_names=model)
    assert data.splits["train"].words == [["New", "York", "1999"], ["in", "Paris"]]
    assert data.splits["train"].tags == [[1, 2, 0], [0, 1]]
    ids = write_csv(tmp_path / "ids.csv", ["tokens", "tags"], [("to Rome", "0 1"), ("1999", "[0]")])
    data, _ = load("token-classification", train=ids, validation=ids, test=ids, model_label_names=model)
    assert data.splits["test"].words == [["to", "Rome"], ["1999"]] and data.splits["test"].tags == [[0, 1], [0]]
    rows.append(("to Rome", "0 1"))  # ids among names: mixed types
    message = error("token-classification", train=write_csv(tmp_path / "mixed.csv", ["tokens", "tags"], rows))
    assert "mixed tag types (string: 5, integer: 2)" in message and "data rows 3" in message


def squad(question, context, answer, start=None):
    start = context.index(answer) if start is None else start
    return {"id": question[:3], "question": question, "context": context, "answers": {"text": [answer], "answer_start": [start]}}


def test_question_answering_from_squad_json_lines_and_csv(tmp_path):
    records = [squad("Who wrote it?", "It was written by Ada in 1843.", "Ada"), squad("When?", "It was written by Ada in 1843.", "1843")]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    data, _ = load("question-answering", train=path, validation=path, test=path)
    qa = data.splits["train"]
    assert isinstance(qa, QADataset) and qa.questions == [r["question"] for r in records]
    assert qa.answers == [r["answers"] for r in records] and data.label_names == () and data.problem is None
    rows = [(r["question"], r["context"], json.dumps(r["answers"])) for r in records]
    path = write_csv(tmp_path / "qa.csv", ["q", "c", "a"], rows)
    data, _ = load("question-answering", train=path, validation=path, test=path, columns={"question": "q", "context": "c", "answers": "a"})
    assert data.splits["test"].answers == [r["answers"] for r in records]


def test_feature_extraction_texts_and_pairs(tmp_path):
    texts = write_jsonl(tmp_path / "t.jsonl", [{"sentence": f"s{i}"} for i in range(3)])
    data, _ = load("feature-extraction", train=texts, validation=texts, test=texts, columns={"text": "sentence"})
    assert isinstance(data.splits["train"], EmbeddingDataset) and data.splits["train"].texts == ["s0", "s1", "s2"]
    pairs = write_csv(tmp_path / "p.csv", ["q", "d"], [("q1", "d1"), ("q2", "d2")])
    data, _ = load("feature-extraction", train=pairs, validation=pairs, test=pairs, columns={"query": "q", "document": "d"})
    split = data.splits["train"]
    assert split.texts == ["q1", "q2", "d1", "d2"] and split.queries == ["q1", "q2"] and split.documents == ["d1", "d2"]
    mixed = write_csv(tmp_path / "m.csv", ["text", "query", "document"], [("a", "q1", "d1"), ("b", "", "")])
    split = load("feature-extraction", train=mixed, validation=mixed, test=mixed)[0].splits["test"]
    assert split.texts == ["a", "b"] and split.queries == ["q1"] and split.documents == ["d1"]


# --- cutting splits --------------------------------------------------------------------------------------------------

def grouped_file(tmp_path, n_groups=60):
    rows = [(f"text {g}.{k}", ["a", "b"][(g + k) % 2], f"g{g}") for g in range(n_groups) for k in range(1 + g % 5)]
    return write_csv(tmp_path / "grouped.csv", ["text", "label", "source"], rows), rows


def test_group_aware_cut_is_seeded_and_keeps_groups_apart(tmp_path):
    path, rows = grouped_file(tmp_path)
    data, logs = load("text-classification", train=path, group="source", validation_share=0.2, test_share=0.1)
    groups = {s: set(d.groups) for s, d in data.splits.items()}
    assert not groups["train"] & groups["validation"] and not groups["train"] & groups["test"] and not groups["validation"] & groups["test"]
    sizes = {s: len(d) for s, d in data.splits.items()}
    assert sum(sizes.values()) == len(rows)
    assert abs(sizes["validation"] - 0.2 * len(rows)) <= 6 and abs(sizes["test"] - 0.1 * len(rows)) <= 6
    assert data.files["validation"] == data.files["test"] == f"cut from {path}"
    cut = [line for line in logs if line.startswith("cut")]
    assert len(cut) == 1 and f"validation {sizes['validation']} rows" in cut[0] and f"test {sizes['test']} rows" in cut[0]
    same, _ = load("text-classification", train=path, group="source", validation_share=0.2, test_share=0.1)
    other, _ = load("text-classification", train=path, group="source", validation_share=0.2, test_share=0.1, split_seed=1)
    assert same.splits["test"].texts == data.splits["test"].texts
    assert other.splits["test"].texts != data.splits["test"].texts


def test_cut_only_the_missing_split_row_by_row(tmp_path):
    path, rows = grouped_file(tmp_path, 20)
    test_file = write_csv(tmp_path / "test.csv", ["text", "label", "source"], [("held out", "a", "x")])
    data, logs = load("text-classification", train=path, test=test_file, validation_share=0.25)
    assert data.files["test"] == str(test_file) and data.files["validation"] == f"cut from {path}"
    assert len(data.splits["train"]) + len(data.splits["validation"]) == len(rows)
    n_val, n_train = len(data.splits["validation"]), len(data.splits["train"])
    assert n_val == round(0.25 * len(rows)) and data.splits["train"].groups == []
    cut = [line for line in logs if line.startswith("cut")]
    assert cut == [f"cut from {path}, seed 0, row by row: validation {n_val} rows (25%); train keeps {n_train} rows"]


# --- errors: files ---------------------------------------------------------------------------------------------------

def test_bad_arguments(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [("a", 1)])
    assert "text-classification, token-classification, question-answering, feature-extraction" in error("summarization", train=path)
    assert "train" in error("text-classification")
    assert "validation_share" in error("text-classification", train=path, validation_share=0.5)
    message = error("text-classification", train=path, columns={"txt": "review"})
    assert "'txt'" in message and "text, label, text_pair" in message


def test_missing_and_unreadable_files(tmp_path):
    assert "nope.csv" in error("text-classification", FileNotFoundError, train=tmp_path / "nope.csv")
    (tmp_path / "d.xlsx").write_bytes(b"PK\x03\x04")
    message = error("text-classification", train=tmp_path / "d.xlsx")
    assert "d.xlsx" in message and ".csv" in message and ".parquet" in message
    (tmp_path / "bad.parquet").write_bytes(b"\x00garbage\xff" * 10)
    message = error("text-classification", train=tmp_path / "bad.parquet")
    assert "bad.parquet" in message and "Parquet" in message
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    assert "bad.json" in error("text-classification", train=tmp_path / "bad.json")
    (tmp_path / "folder").mkdir()
    assert "save_to_disk" in error("text-classification", train=tmp_path / "folder")


def test_missing_column_lists_the_files_columns(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["review", "stars"], [("a", 1)])
    message = error("text-classification", train=path, columns={"text": "review", "label": "sentiment"})
    assert "d.csv" in message and "'sentiment'" in message and "review, stars" in message
    assert "'movie'" in error("text-classification", train=path, columns={"text": "review", "label": "stars"}, group="movie")
    message = error("feature-extraction", train=write_csv(tmp_path / "q.csv", ["query"], [("q",)]))
    assert "'document'" in message


def test_empty_splits(tmp_path):
    header_only = write_csv(tmp_path / "h.csv", ["text", "label"], [])
    assert "h.csv" in error("text-classification", train=header_only) and "no data rows" in error("text-classification", train=header_only)
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    assert "e.jsonl is empty" in error("text-classification", train=tmp_path / "e.jsonl")
    one_group = write_csv(tmp_path / "g.csv", ["text", "label", "src"], [(f"t{i}", 0, "same") for i in range(5)])
    message = error("text-classification", train=one_group, group="src")
    assert "empty" in message and "1 groups" in message and "g.csv" in message


# --- errors: rows ----------------------------------------------------------------------------------------------------

def test_label_the_model_does_not_have(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "sentiment"], [("a", "pos"), ("b", "meh"), ("c", "neg"), ("d", "meh")])
    message = error("text-classification", train=path, columns={"label": "sentiment"}, model_label_names=("neg", "pos"))
    assert "does not have ['meh']" in message and "'sentiment'" in message and "d.csv" in message
    assert "2 row(s)" in message and "data rows 2 ('meh'), 4 ('meh')" in message and "['neg', 'pos']" in message
    ints = write_csv(tmp_path / "i.csv", ["text", "label"], [("a", 0), ("b", 2)])
    assert "0..1" in error("text-classification", train=ints, model_label_names=("neg", "pos"))


def test_placeholder_names_need_label_names(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [("a", "pos"), ("b", "neg")])
    message = error("text-classification", train=path, model_label_names=("LABEL_0", "LABEL_1"))
    assert "['LABEL_0', 'LABEL_1']" in message and "['neg', 'pos']" in message and "label_names = [the name of id 0, id 1, ...] in the model's own order" in message


@pytest.mark.parametrize("labels, rare", [(["pos", 1, "neg"], "integer"), ([0, 1, 2.5, "x", "y", "z"], None)])
def test_mixed_label_types_in_json(tmp_path, labels, rare):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": v} for i, v in enumerate(labels)])
    message = error("text-classification", train=path)
    assert "mixed label types" in message and "d.jsonl" in message and "'label'" in message
    if rare:
        assert f"the {rare} ones are in 1 row(s): data rows 2 (1)" in message


def test_mixed_label_types_in_csv_and_between_files(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [("a", "pos"), ("b", "1"), ("c", "neg")])
    assert "mixed label types" in error("text-classification", train=path)
    ints = write_csv(tmp_path / "i.csv", ["text", "label"], [("a", 1), ("b", 0)])
    strings = write_csv(tmp_path / "s.csv", ["text", "label"], [("c", "pos")])
    message = error("text-classification", train=ints, test=strings)
    assert "between files" in message and "i.csv has integers" in message and "s.csv has strings" in message


# a CSV's empty cell and a NaN among JSON strings both reach Python as None
@pytest.mark.parametrize("bad, shown", [("", "None"), ("   ", "'   '"), (None, "None"), (float("nan"), "None"), (7, "7")])
def test_blank_or_non_text_text(tmp_path, bad, shown):
    records = [{"text": "fine", "label": 0}, {"text": bad, "label": 1}, {"text": "ok", "label": 0}]
    if bad == "":
        path = write_csv(tmp_path / "d.csv", ["text", "label"], [(r["text"], r["label"]) for r in records])
    else:
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in records), encoding="utf-8")
    message = error("text-classification", train=path)
    assert "blank or non-text" in message and f"data rows 2 ({shown})" in message and path.name in message


def test_many_bad_rows_show_five_and_a_count(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["body", "label"], [("ok" if i % 2 else " ", 0) for i in range(16)])
    message = error("text-classification", train=path, columns={"text": "body"})
    assert "column 'body'" in message and "8 row(s)" in message and "data rows 1 (' '), 3" in message
    assert "9 (' '), and 3 more" in message and "11 (" not in message


def test_blank_labels_and_groups(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label", "src"], [("a", 1, "x"), ("b", "", "y"), ("c", 0, "")])
    assert "blank labels" in error("text-classification", train=path, validation=path, test=path)
    assert "blank group values" in error("text-classification", train=path, group="src") and "data rows 3" in error("text-classification", train=path, group="src")


def test_tags_must_match_words_and_the_models_tags(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["c", "d"], "tags": ["O"]}])
    message = error("token-classification", train=path)
    assert "length differs" in message and "data rows 2" in message and "'tags'" in message
    path = write_jsonl(tmp_path / "u.jsonl", [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b", "c"], "tags": ["B-XYZ", "O"]}])
    message = error("token-classification", train=path, model_label_names=("O", "B-PER", "I-PER"))
    assert "does not have ['B-XYZ']" in message and "data rows 2 ('B-XYZ')" in message  # the bad tag, not the row


def test_answers_must_be_in_the_context(tmp_path):
    context = "The cat sat on the mat."
    wrong = write_jsonl(tmp_path / "w.jsonl", [squad("q1?", context, "cat"), squad("q2?", context, "mat", start=3)])
    message = error("question-answering", train=wrong)
    assert "not found at its answer_start" in message and "data rows 2" in message and "w.jsonl" in message
    outside = write_jsonl(tmp_path / "o.jsonl", [squad("q1?", context, "cat", start=99)])
    assert "outside the context" in error("question-answering", train=outside)


def test_query_without_its_document(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["q", "d"], [("q1", "d1"), ("q2", ""), ("q3", "d3")])
    message = error("feature-extraction", train=path, columns={"query": "q", "document": "d"})
    assert "a query without its document" in message and "column 'd'" in message and "data rows 2" in message


def test_shared_texts_are_counted_and_strict_refuses_them(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], [("a", 0), ("b", 1), ("c", 0)])
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [("a", 0), ("b", 1), ("z", 1)])
    val = write_csv(tmp_path / "val.csv", ["text", "label"], [("v", 0)])
    data, logs = load("text-classification", train=train, validation=val, test=test)
    assert data.overlaps == {"train/validation": 0, "train/test": 2, "validation/test": 0}
    assert any("train/test 2" in line for line in logs)
    assert "train/test 2" in error("text-classification", train=train, validation=val, test=test, strict=True)


def test_error_message_format(tmp_path):
    # a pattern check over one error: file, column as in the file, 1-based rows, and what is allowed
    path = write_csv(tmp_path / "d.csv", ["review", "label"], [("a", 0), ("", 1)])
    message = error("text-classification", train=path, columns={"text": "review"})
    assert re.search(r"d\.csv, column 'review': .* in 1 row\(s\): data rows 2 \(None\)\. Each row needs", message)
