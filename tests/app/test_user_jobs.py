"""A user's own model folder and data files through `graphprune run`, `search`, `eval` and export, on every task."""

import csv
import json

import pytest
import torch
import transformers as tf

import graphprune
from graphprune.app.cli import main
from graphprune.app.job_inputs import load_inputs
from graphprune.app.run_file import run_file
from graphprune.training.data import TextDataset

from ..models import NER_TAGS, TINY, ner_data, qa_data, sentiment_data, tiny_tokenizer


def save_folder(folder, model):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def sentiment_folder(tmp_path, labels=("neg", "pos")):
    torch.manual_seed(0)
    config = tf.BertConfig(**TINY, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return save_folder(tmp_path / "model", tf.BertForSequenceClassification(config).eval())


def write_csv(path, rows, header):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def sentiment_csvs(tmp_path):
    """The toy snippets as a user's CSVs: their own column names, labels as strings."""
    files = {}
    for split, seed, n in (("train", 0, 48), ("test", 1, 24)):
        data = sentiment_data(n, seed=seed)
        files[split] = write_csv(tmp_path / f"{split}.csv", [(t, data.label_names[y]) for t, y in zip(data.texts, data.labels)], ["review", "sentiment"])
    return files


PIPELINE = """
[[passes]]
name = "structured_search"
method = "kprune"
flops = 0.6
num_samples = 32
score_samples = 16
reconstruct_samples = 16
seq_len = 16
progress = false

[finetune]
max_steps = 3
batch_size = 8
distill = true
progress = false
"""


def test_a_user_folder_and_csv_run_exactly_as_the_same_model_and_data_given_in_python(tmp_path):
    folder, files = sentiment_folder(tmp_path), sentiment_csvs(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(f"""
[model]
path = "{folder}"

[data]
train = "{files['train']}"
test = "{files['test']}"
columns = {{ text = "review", label = "sentiment" }}
max_length = 16
{PIPELINE}""")
    lines = []
    table = run_file(job, log=lines.append)
    # the oracle: the same model traced and the same snippets as a TextDataset, through the Python API
    graph = graphprune.trace(tf.BertForSequenceClassification.from_pretrained(folder).eval())
    tokenizer = tiny_tokenizer()
    loaded = load_inputs(job, {"path": str(folder)}, {"train": str(files["train"]), "test": str(files["test"]),
                                                      "columns": {"text": "review", "label": "sentiment"}}, log=lambda line: None)
    train = loaded.splits["train"]
    test = TextDataset(sentiment_data(24, seed=1).texts, sentiment_data(24, seed=1).labels, ("neg", "pos"), name="test")
    pruned, _ = graphprune.run_pipeline(graph, [("structured_search", {"method": "kprune", "flops": 0.6, "num_samples": 32, "score_samples": 16,
                                                                       "reconstruct_samples": 16, "seq_len": 16, "progress": False})],
                                        data=graphprune.CalibrationData(train, tokenizer, max_length=16))
    graphprune.finetune(pruned, train, tokenizer, teacher=graph, max_steps=3, batch_size=8, max_length=16, progress=False)
    expected = graphprune.evaluate(pruned, test, tokenizer, max_length=16, progress=False)
    assert [r["stage"] for r in table.rows] == ["input model", "after passes", "after fine-tune"]
    assert table.rows[-1]["accuracy"] == round(expected["accuracy"], 4) and table.rows[-1]["loss"] == round(expected["loss"], 4)
    assert sorted(set(train.labels)) == [0, 1] and train.label_names == ("neg", "pos")


def test_a_token_classification_folder_and_json_lines_run_with_kprune_and_report_entity_f1(tmp_path):
    torch.manual_seed(0)
    config = tf.BertConfig(**TINY, num_labels=len(NER_TAGS), id2label=dict(enumerate(NER_TAGS)), label2id={t: i for i, t in enumerate(NER_TAGS)})
    folder = save_folder(tmp_path / "ner", tf.BertForTokenClassification(config).eval())
    data = ner_data(60, seed=0)
    with open(tmp_path / "ner.jsonl", "w") as handle:
        for words, tags in zip(data.words, data.tags):
            handle.write(json.dumps({"words": words, "ner": [NER_TAGS[t] for t in tags]}) + "\n")
    job = tmp_path / "job.toml"
    job.write_text(f"""
[model]
path = "{folder}"

[data]
train = "{tmp_path / 'ner.jsonl'}"
columns = {{ tokens = "words", tags = "ner" }}
test_share = 0.25
validation_share = 0.2
max_length = 16
{PIPELINE}
[[export]]
path = "{tmp_path / 'artefact'}"
format = "onnx"
""")
    lines = []
    table = run_file(job, log=lines.append)
    assert table.columns[1] == "f1" and len(table.rows) == 3
    exported = next(line for line in lines if line.startswith("exported"))
    assert " f1 " in exported and "in its own runtime" in exported
    checkpoint_f1 = table.rows[-1]["f1"]
    assert f"f1 {checkpoint_f1:.4f}"[:7] in exported  # the artefact scores as the graph did (to 2 decimals at least)


def test_an_embedder_is_compressed_from_unlabelled_text_and_scored_by_retrieval(tmp_path):
    torch.manual_seed(0)
    folder = save_folder(tmp_path / "st", tf.BertModel(tf.BertConfig(**TINY)).eval())
    (folder / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                                                     {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    texts = sentiment_data(80, seed=2).texts
    write_csv(tmp_path / "pairs.csv", [(" ".join(t.split()[:2]), t) for t in texts], ["query", "document"])
    job = tmp_path / "job.toml"
    job.write_text(f"""
[model]
path = "{folder}"

[data]
train = "{tmp_path / 'pairs.csv'}"
max_length = 16
{PIPELINE}""")
    table = run_file(job, log=lambda line: None)
    assert table.columns[1] == "mrr@10"
    dense, pruned = table.rows[0]["mrr@10"], table.rows[-1]["mrr@10"]
    assert 0 < pruned <= 1 and 0 < dense <= 1 and table.rows[-1]["params"] < table.rows[0]["params"]


def test_a_qa_checkpoint_evaluates_from_a_job_files_data_on_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    folder = save_folder(tmp_path / "qa", tf.BertForQuestionAnswering(tf.BertConfig(**TINY)).eval())
    data = qa_data(20, seed=0)
    with open(tmp_path / "squad.jsonl", "w") as handle:
        for q, c, a in zip(data.questions, data.contexts, data.answers):
            handle.write(json.dumps({"question": q, "context": c, "answers": a}) + "\n")
    graph = graphprune.load_model(folder)
    graph.save(tmp_path / "ckpt")
    job = tmp_path / "data.toml"
    job.write_text(f'[data]\ntrain = "{tmp_path / "squad.jsonl"}"\ntest_share = 0.4\n')
    assert main(["eval", str(tmp_path / "ckpt"), "--data", str(job), "--max-length", "24"]) == 0
    out = capsys.readouterr().out
    splits = graphprune.load_data("question-answering", train=tmp_path / "squad.jsonl", test_share=0.4, log=lambda line: None).splits
    expected = graphprune.evaluate(graph, splits["test"], tiny_tokenizer(), max_length=24, progress=False)
    line = out.splitlines()[-1]  # after the model's and the data's log lines
    assert line == (f"squad/test: f1 {expected['f1']:.4f}  exact_match {expected['exact_match']:.4f}  loss {expected['loss']:.4f}  "
                    f"({len(splits['test'])} examples)")


def test_a_search_objective_the_task_does_not_measure_is_refused_before_any_trial(tmp_path):
    folder, files = sentiment_folder(tmp_path), sentiment_csvs(tmp_path)
    job = tmp_path / "search.toml"
    job.write_text(f"""
[model]
path = "{folder}"

[data]
train = "{files['train']}"
columns = {{ text = "review", label = "sentiment" }}

[search]
trials = 1
objectives = ["f1", "latency"]

[[passes]]
name = "prune_weight"
sparsity = {{ range = [0.1, 0.5] }}
""")
    with pytest.raises(ValueError, match="'f1' names a metric this model's task does not measure; it measures accuracy, macro_f1"):
        graphprune.search(job, progress=False, log=lambda line: None)
    assert not (tmp_path / "search_search").exists()


@pytest.mark.parametrize("model, message", [
    ({"path": "x", "name": "baseline"}, "exactly one of name"),
    ({"path": "x", "task": "summarization"}, "task = 'summarization' is not allowed"),
    ({"name": "baseline", "task": "text-classification"}, "task is for path = or hub = models"),
    ({"path": "x", "label_names": "pos"}, "label_names = 'pos' is not allowed"),
])
def test_model_section_mistakes_name_the_field(tmp_path, model, message):
    job = tmp_path / "job.toml"
    lines = ["[model]"] + [f"{k} = {json.dumps(v)}" for k, v in model.items()]
    job.write_text("\n".join(lines) + '\n[data]\nname = "rotten_tomatoes"\n')
    with pytest.raises(ValueError, match=message):
        run_file(job, log=lambda line: None)
