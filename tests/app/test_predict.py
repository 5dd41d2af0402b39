"""``predict.py``, the script every artefact carries: it speaks the artefact's task, and only its runtime.

Each tiny model is exported once (ONNX for every task; ``hf`` for token
classification, ``aoti`` for an embedder) and ``predict.py --json`` is run in a fresh
interpreter; its answers are checked against the eager HF model computed here: the
softmax of its logits, its per-word tags grouped into entities by hand, a brute-force
search of its answer spans over every window, its mean-pooled hidden states.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf

import graphprune
from graphprune.ir.runtime import cxx_compiler
from tests.models import FILLER, NEGATIVE, NER_TAGS, POSITIVE, TINY

pytest.importorskip("onnxruntime")

LENGTH = TINY["max_position_embeddings"]  # what the manifest records as max_length, so what predict.py tokenises to
PIECES = ["##s", "##ly", "##ing"]  # so that some words are several sub-tokens
TEXTS = ["good w1 w2 great fun", "bad w3", "w4 goods w5 funly moving w6 superb w7", "awful boring weak w8 w9 w10 w11 dull",
         "an unknown word here", "great"]
CONTEXTS = [" ".join(FILLER[(7 * i) % 60] if i % 9 else POSITIVE[i % 5] for i in range(k, k + 110)) for k in (0, 3)] + ["w1 good w2"]
QUESTION = "good w5"


def tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + PIECES
    return tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def strong(model, head: str | None = None, centre_on=None):
    """A random tiny model that tells texts apart: as it comes, its outputs differ by ~0.002 between texts.

    Linear weights times 5 (so attention mixes the words in), the head's weights of unit
    gain, and with ``centre_on`` (texts) the head's bias centred on those texts' logits,
    so that they fall in different classes and tags.
    """
    torch.manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5.0)
        if head is not None:
            layer = model.get_submodule(head)
            layer.weight.normal_(0, layer.in_features**-0.5 * 4)
            layer.bias.zero_()
            if hasattr(model, "bert") and model.bert.pooler is not None:
                model.bert.pooler.dense.weight.normal_(0, model.bert.pooler.dense.in_features**-0.5)
        if centre_on is not None:
            logits = model(**tokenizer()(centre_on, padding=True, return_tensors="pt")).logits
            layer.bias.copy_(-logits.flatten(0, -2).mean(0))
    return model


def make(cls, **config):
    torch.manual_seed(0)
    return getattr(tf, cls)(tf.BertConfig(**TINY, **config)).eval()


def script_start(folder, *args, log) -> tuple:
    """``predict.py FOLDER ARGS`` started in a fresh interpreter, with the modules it imports listed (``-X importtime``).

    Its output goes to files ``log``.out and ``log``.err: a pipe would fill and stall it until read.
    """
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
    command = [sys.executable, "-X", "importtime", str(folder / "predict.py"), str(folder), *args]
    return subprocess.Popen(command, stdout=out, stderr=err, text=True), out, err, log


def script_result(started) -> subprocess.CompletedProcess:
    process, out, err, log = started
    process.wait(timeout=300)
    out.close(), err.close()
    return subprocess.CompletedProcess(process.args, process.returncode, open(f"{log}.out").read(), open(f"{log}.err").read())


def imported(done) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def rows(done) -> list[dict]:
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def predict_module(folder):
    """``from predict import load``, of this artefact's own copy."""
    spec = importlib.util.spec_from_file_location(f"predict_{folder.name.replace('-', '_')}", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The eager models, their artefacts, and each artefact's ``predict.py --json`` run (each costs seconds: they run
    in the background while the next model exports)."""
    root = tmp_path_factory.mktemp("predict")
    tags = dict(id2label=dict(enumerate(NER_TAGS)), label2id={t: i for i, t in enumerate(NER_TAGS)})
    models = {
        "cls": strong(make("BertForSequenceClassification", num_labels=3, id2label={0: "neg", 1: "mixed", 2: "pos"},
                           label2id={"neg": 0, "mixed": 1, "pos": 2}), "classifier", TEXTS),
        "tok": strong(make("BertForTokenClassification", **tags), "classifier", TEXTS),
        "qa": strong(make("BertForQuestionAnswering"), "qa_outputs"),
        "embed": strong(make("BertModel")),
    }
    exports = {"cls": ("cls", "onnx", {}), "tok": ("tok", "onnx", {}), "qa": ("qa", "onnx", {}), "embed": ("embed", "onnx", {"pooling": "mean"}),
               "tok-hf": ("tok", "hf", {})}
    if cxx_compiler() is not None:
        exports["embed-aoti"] = ("embed", "aoti", {})  # no pooling option: predict.py pools last_hidden_state itself
    # one thread each: the tiny models gain nothing from more, and the runs overlap the exports
    commands = {name: ["--json", "--threads", "1", *(["--question", QUESTION, *CONTEXTS] if name == "qa" else TEXTS)] for name in exports}
    commands["cls"] += ["--batch-size", "2"]
    commands["qa-no-question"] = ["--json", *CONTEXTS]
    traced, manifests, runs = {}, {}, {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the exports' checks in fresh processes, and the runs
        for name, (model, fmt, options) in exports.items():
            if model not in traced:
                traced[model] = graphprune.trace(models[model])
            graph = traced[model].copy()
            if name == "embed-aoti":
                graph.source["normalize"] = True  # as a sentence-transformers model with a Normalize module records it
            options = {**options, "optimize": False} if fmt == "onnx" else options
            manifests[name] = graph.export(root / name, format=fmt, tokenizer=tokenizer(), **options)
            for run in (name, f"{name}-no-question"):
                if run in commands:  # predict.py runs while the next model exports
                    runs[run] = script_start(root / name, *commands[run], log=root / f"{run}.log")
    runs = {name: script_result(run) for name, run in runs.items()}
    return {"root": root, "models": models, "manifests": manifests, "runs": runs}


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_manifests_record_what_predict_reads(made):
    manifests = made["manifests"]
    assert manifests["cls"]["task"] == "sequence_classification" and manifests["cls"]["labels"] == ["neg", "mixed", "pos"]
    assert manifests["tok"]["labels"] == list(NER_TAGS) and manifests["qa"]["task"] == "question_answering"
    assert all(m["max_length"] == LENGTH for m in manifests.values())
    assert manifests["embed"]["embedding_pooling"] == "mean" and manifests["embed"]["normalize"] is False
    assert manifests["cls"]["embedding_pooling"] is None and manifests["cls"]["problem_type"] is None
    if "embed-aoti" in manifests:
        assert manifests["embed-aoti"]["normalize"] is True and manifests["embed-aoti"]["outputs"] == ["last_hidden_state"]


def test_predict_imports_no_graphprune(made):
    for name, done in made["runs"].items():
        modules = imported(done)
        assert "numpy" in modules and ("transformers" in modules or name == "qa-no-question"), name  # the list is whole
        assert not {m for m in modules if m.split(".")[0] == "graphprune"}, name
    assert not any(m["verification"]["graphprune_imported"] for m in made["manifests"].values())  # --check, as before


def test_text_classification_is_the_softmax_of_the_eager_logits(made):
    encoded = tokenizer()(TEXTS, padding=True, truncation=True, max_length=LENGTH, return_tensors="pt")
    with torch.no_grad():
        probs = softmax(made["models"]["cls"](**encoded).logits.double().numpy())
    got = rows(made["runs"]["cls"])
    names = ["neg", "mixed", "pos"]
    assert [r["text"] for r in got] == TEXTS
    assert len({r["label"] for r in got}) >= 2  # the head is strong enough to tell texts apart
    for row, p in zip(got, probs):
        assert row["label"] == names[int(p.argmax())] and row["score"] == pytest.approx(p.max(), abs=1e-4)
        assert list(row["scores"]) == names and np.allclose([row["scores"][n] for n in names], p, atol=1e-4)


def test_a_multi_label_manifest_gives_every_label_over_one_half(made, tmp_path, capsys):
    folder = tmp_path / "multi"
    shutil.copytree(made["root"] / "cls", folder)
    manifest = json.loads((folder / "artefact.json").read_text())
    (folder / "artefact.json").write_text(json.dumps({**manifest, "problem_type": "multi_label_classification"}))
    encoded = tokenizer()(TEXTS, padding=True, truncation=True, max_length=LENGTH, return_tensors="pt")
    with torch.no_grad():
        sigmoid = torch.sigmoid(made["models"]["cls"](**encoded).logits.double()).numpy()
    got = predict_module(folder).load(folder).predict(TEXTS)
    names = np.array(["neg", "mixed", "pos"])
    assert {len(r["labels"]) for r in got} - {1} and any(r["labels"] for r in got)  # not every text has exactly one
    for row, p in zip(got, sigmoid):
        assert row["labels"] == list(names[p > 0.5]) and np.allclose(list(row["scores"].values()), p, atol=1e-4)
    predict_module(folder).main([str(folder), TEXTS[0]])
    want = names[sigmoid[0] > 0.5]
    assert capsys.readouterr().out == f"{','.join(want) or '-'}\t{','.join(f'{v:.3f}' for v in sigmoid[0][sigmoid[0] > 0.5])}\t{TEXTS[0]}\n"


def eager_word_tags(model, text):
    """Each word's tag and probability from its first sub-token, found by counting each word's sub-tokens."""
    words = text.split()
    firsts = 1 + np.cumsum([0] + [len(tokenizer().tokenize(w)) for w in words[:-1]])  # after [CLS]
    ids = tokenizer()(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probs = softmax(model(**ids).logits[0].double().numpy())[firsts]
    return words, [NER_TAGS[int(p.argmax())] for p in probs], probs.max(-1)


def entities_by_hand(words, tags, scores):
    """(type, text, score) of each run that a B-X or I-X starts and I-X continues."""
    found, i = [], 0
    while i < len(tags):
        if tags[i] == "O":
            i += 1
            continue
        kind, j = tags[i][2:], i + 1
        while j < len(tags) and tags[j] == f"I-{kind}":
            j += 1
        found.append((kind, " ".join(words[i:j]), float(np.mean(scores[i:j]))))
        i = j
    return found


@pytest.mark.parametrize("name", ["tok", "tok-hf"])
def test_token_classification_groups_the_eager_tags_into_entities(made, name):
    got = rows(made["runs"][name])
    spans = 0
    for text, row in zip(TEXTS, got):
        words, tags, scores = eager_word_tags(made["models"]["tok"], text)
        assert [(w["word"], w["tag"]) for w in row["words"]] == list(zip(words, tags))
        assert np.allclose([w["score"] for w in row["words"]], scores, atol=1e-4)
        want = entities_by_hand(words, tags, scores)
        assert [(e["type"], e["text"]) for e in row["entities"]] == [(k, t) for k, t, _ in want]
        assert np.allclose([e["score"] for e in row["entities"]], [s for _, _, s in want], atol=1e-4)
        assert all(text[e["start"]:e["end"]] == e["text"] for e in row["entities"])
        spans += sum(" " in t for _, t, _ in want)
    assert spans >= 1  # some entity spans several words


def test_the_hf_folder_keeps_the_token_classification_head(made):
    folder = made["root"] / "tok-hf"
    assert made["manifests"]["tok-hf"]["hf_class"] == "BertForTokenClassification"
    assert tf.AutoConfig.from_pretrained(folder).architectures == ["BertForTokenClassification"]
    assert type(tf.AutoModelForTokenClassification.from_pretrained(folder)).__name__ == "BertForTokenClassification"


def test_token_classification_text_mode_and_tags_without_iob2(made, tmp_path, capsys):
    folder = tmp_path / "plain-tags"
    shutil.copytree(made["root"] / "tok", folder)
    manifest = json.loads((folder / "artefact.json").read_text())
    (folder / "artefact.json").write_text(json.dumps({**manifest, "labels": ["o", "pos", "pos2", "neg", "neg2"]}))
    words, tags, scores = eager_word_tags(made["models"]["tok"], TEXTS[2])
    plain = dict(zip(NER_TAGS, ["o", "pos", "pos2", "neg", "neg2"]))
    predict_module(folder).main([str(folder), TEXTS[2]])
    lines = [f"{plain[t]}\t{s:.3f}\t{w}" for w, t, s in zip(words, tags, scores)]
    assert capsys.readouterr().out == "\n".join([TEXTS[2], *lines, "", ""])
    row = predict_module(folder).load(folder).predict([TEXTS[2]])[0]
    assert row["entities"] is None and [w["tag"] for w in row["words"]] == [plain[t] for t in tags]


def brute_force_answer(model, question, context):
    """The best start + end logit over every window by a double loop, and P(start) * P(end) over its window's context."""
    encoded = tokenizer()(question, context, truncation="only_second", max_length=LENGTH, stride=LENGTH // 4,
                          return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**{k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    best = None
    for w in range(len(encoded["input_ids"])):
        start, end = out.start_logits[w].double().numpy(), out.end_logits[w].double().numpy()
        context_tokens = [i for i, s in enumerate(encoded.sequence_ids(w)) if s == 1]
        for s in context_tokens:
            for e in context_tokens:
                if s <= e < s + 30 and (best is None or start[s] + end[e] > best[0]):
                    p_start, p_end = softmax(start[context_tokens]), softmax(end[context_tokens])
                    score = p_start[context_tokens.index(s)] * p_end[context_tokens.index(e)]
                    offsets = encoded["offset_mapping"][w]
                    best = (start[s] + end[e], w, int(offsets[s][0]), int(offsets[e][1]), score)
    return best


def test_question_answering_finds_the_best_span_over_every_window(made):
    got = rows(made["runs"]["qa"])
    windows = set()
    for context, row in zip(CONTEXTS, got):
        _, window, a, b, score = brute_force_answer(made["models"]["qa"], QUESTION, context)
        windows.add(window)
        assert (row["text"], row["question"]) == (context, QUESTION)
        assert (row["answer"], row["start"], row["end"]) == (context[a:b], a, b) and row["answer"]
        assert row["score"] == pytest.approx(score, abs=1e-4)
    assert max(windows) > 0  # an answer came from a window after the first
    folder = made["root"] / "qa"
    again = predict_module(folder).load(folder).predict(CONTEXTS, QUESTION, batch_size=2)  # windows run two at a time
    assert [(r["answer"], r["start"]) for r in again] == [(r["answer"], r["start"]) for r in got]
    assert [r["score"] for r in again] == pytest.approx([r["score"] for r in got], abs=1e-5)


def test_usage_errors_exit_nonzero_with_a_message(made):
    done = made["runs"]["qa-no-question"]
    assert done.returncode == 2 and "answers questions: pass a question (--question" in done.stderr and done.stdout == ""
    folder = made["root"] / "cls"
    module = predict_module(folder)
    with pytest.raises(SystemExit) as exit_info:
        module.main([str(folder), "--question", "why?", "a text"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="answers questions"):
        predict_module(made["root"] / "qa").load(made["root"] / "qa").predict(CONTEXTS)
    with pytest.raises(ValueError, match="encode is for feature-extraction"):
        module.load(folder).encode(TEXTS)
    with pytest.raises(SystemExit):
        module.main([str(made["root"]), "a text"])  # not an artefact folder


def eager_mean(model, texts):
    encoded = tokenizer()(texts, padding=True, truncation=True, max_length=LENGTH, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state.double()
    mask = encoded["attention_mask"][..., None].double()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy(), hidden.numpy(), encoded["attention_mask"].numpy()


def cosines(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("name", ["embed", "embed-aoti"])
def test_embeddings_are_the_eager_mean_pooling(made, name):
    if name not in made["runs"]:
        pytest.skip("AOTInductor compiles C++ (g++)")
    want, _, _ = eager_mean(made["models"]["embed"], TEXTS)
    if made["manifests"][name]["normalize"]:
        want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    got = rows(made["runs"][name])
    assert [r["dimension"] for r in got] == [TINY["hidden_size"]] * len(TEXTS)
    assert cosines([r["embedding"] for r in got], want).min() > 0.9999
    np.testing.assert_allclose([r["embedding"] for r in got], want, atol=1e-4)
    folder = made["root"] / name
    model = predict_module(folder).load(folder)
    encoded = model.encode(TEXTS, batch_size=4)
    assert encoded.shape == (len(TEXTS), TINY["hidden_size"]) and encoded.dtype == np.float32
    np.testing.assert_allclose(encoded, want, atol=1e-4)
    unit = model.encode(TEXTS[0], normalize_embeddings=True)
    np.testing.assert_allclose(unit, want[0] / np.linalg.norm(want[0]), atol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_embeddings_pool_as_the_manifest_says(made, tmp_path, pooling):
    folder = tmp_path / pooling
    shutil.copytree(made["root"] / "embed", folder)  # its sentence_embedding is the mean: predict.py must not use it
    manifest = json.loads((folder / "artefact.json").read_text())
    (folder / "artefact.json").write_text(json.dumps({**manifest, "embedding_pooling": pooling}))
    _, hidden, mask = eager_mean(made["models"]["embed"], TEXTS)
    want = hidden[:, 0] if pooling == "cls" else np.where(mask[..., None] == 1, hidden, -np.inf).max(1)
    np.testing.assert_allclose(predict_module(folder).load(folder).encode(TEXTS), want, atol=1e-4)


def test_text_mode_lines(made, capsys):
    for name, args in (("cls", [TEXTS[0]]), ("qa", ["--question", QUESTION, CONTEXTS[2]]), ("embed", [TEXTS[1]])):
        predict_module(made["root"] / name).main([str(made["root"] / name), *args])
    cls, qa, embed = capsys.readouterr().out.splitlines()
    label, score, text = cls.split("\t")
    assert label in ("neg", "mixed", "pos") and float(score) > 1 / 3 and text == TEXTS[0]
    answer, _, context = qa.split("\t")
    assert answer in CONTEXTS[2] and context == CONTEXTS[2]
    assert embed.startswith(f"dim {TINY['hidden_size']}\t[") and embed.endswith(f", ...]\t{TEXTS[1]}")
