"""Run a model that graphprune exported, without graphprune.

Every artefact folder carries a copy of this file as ``predict.py``::

    python predict.py FOLDER "a gripping film" "two hours I will not get back"
    python predict.py FOLDER --json "a gripping film"
    python predict.py FOLDER --question "who directed it?" "CONTEXT ..." "ANOTHER CONTEXT ..."
    python predict.py FOLDER --check INPUTS.npz OUTPUTS.npz

Predictions speak the artefact's task (the manifest's ``task``), one text at a time:

- text classification: the label and its probability (softmax; sigmoid and every label
  over 0.5 for a multi-label model), e.g. ``pos<TAB>0.973<TAB>a gripping film``;
- token classification: words split on whitespace, each word tagged by its first
  sub-token; IOB2 tags grouped into entities as seqeval and HF's "simple" aggregation
  group them, printed as type, score (the mean of its words' tag probabilities) and
  text, e.g. ``POS<TAB>0.970<TAB>great fun``; other tag sets: each word with its tag;
- question answering: each text is a context; the answer is the best raw
  ``start_logit + end_logit`` over every window of ``max_length`` tokens (stride a
  quarter of it), context tokens only, at most 30 sub-tokens; its score is
  P(start) * P(end), each a softmax over the context tokens of the answer's window;
  e.g. ``Ada Lovelace<TAB>0.812<TAB>CONTEXT``;
- feature extraction (headless encoders): the sentence embedding, pooled as the model
  pools (``mean``, ``cls`` or ``max``; normalised where it normalises), e.g.
  ``dim 384<TAB>[0.0132, -0.0610, 0.0418, 0.0071, ...]<TAB>a gripping film``.

``--json`` prints JSON Lines: one object per text, with ``text`` and the task's fields
(``label``/``score``/``scores``; ``words``/``entities``; ``question``/``answer``/``score``/
``start``/``end``; ``embedding``/``dimension``). ``--check`` runs saved inputs and writes
the outputs, which is how ``graphprune export`` checks an artefact in a fresh process.
From Python::

    from predict import load
    model = load("artefacts/minilm-int8")
    outputs = model({"input_ids": ids, "attention_mask": mask})   # numpy arrays by output name
    model.predict(["a gripping film"])                             # what --json prints, as a list
    model.encode(["a gripping film"], batch_size=32)               # embedders: texts x dim, as sentence-transformers

It imports only the artefact's own runtime: ``onnxruntime`` (format ``onnx``),
``torch`` (``aoti``: ``torch._inductor.aoti_load_package``) or ``transformers``
(``hf``: ``from_pretrained``), plus numpy, and ``transformers``' tokenizer for texts.
It must never import graphprune: keep it standalone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

MANIFEST = "artefact.json"
FORMAT = "graphprune-artefact"
MAX_ANSWER_TOKENS = 30  # as SQuAD evaluation and graphprune's question answering limit answers


def read_manifest(folder) -> dict:
    """The artefact's manifest; ValueError when ``folder`` holds no graphprune artefact."""
    file = Path(folder) / MANIFEST
    if not file.is_file():
        raise ValueError(f"{folder} is not a graphprune artefact folder: {MANIFEST} is missing")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a graphprune artefact manifest")
    return manifest


class Artefact:
    """An exported model in its own runtime: call it with a dict of integer arrays, or ``predict``/``encode`` texts."""

    def __init__(self, folder, *, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.task = self.manifest.get("task")
        self.inputs = list(self.manifest["inputs"])
        self.outputs = list(self.manifest["outputs"])
        loader = {"onnx": _onnx_runner, "aoti": _aoti_runner, "hf": _hf_runner}[self.manifest["artefact"]]
        self._run = loader(self.folder, self.manifest, threads)
        self._tokenizer = None

    def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        given = {name: np.asarray(inputs[name], dtype=np.int64) for name in self.inputs if inputs.get(name) is not None}
        # Absent optional inputs are filled as the model fills them: every token attended, segment 0.
        given.setdefault("attention_mask", np.ones_like(ids))
        given.setdefault("token_type_ids", np.zeros_like(ids))
        values = self._run([given[name] for name in self.inputs])
        return dict(zip(self.outputs, values))

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not (self.folder / "tokenizer_config.json").is_file():
                raise ValueError(f"{self.folder} holds no tokenizer files; tokenise the texts yourself")
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        return self._tokenizer

    @property
    def max_length(self) -> int:
        """The longest input: the model's positions (the manifest's ``max_length``) and the tokenizer's limit."""
        return min(self.manifest.get("max_length") or 512, self.tokenizer().model_max_length)

    def _tokenize(self, *texts, truncation=True, **options):
        return self.tokenizer()(*texts, truncation=truncation, max_length=self.max_length, padding=True, return_tensors="np", **options)

    def predict(self, texts, question=None, *, batch_size: int = 32) -> list[dict]:
        """One dict per text, what ``--json`` prints; ``question`` (one for all texts, or one each) for QA artefacts."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if _question_error(self.task, question):
            raise ValueError(_question_error(self.task, question))
        if self.task == "question_answering":
            questions = [question] * len(texts) if isinstance(question, str) else list(question)
            return [self._answer(q, context, batch_size) for q, context in zip(questions, texts, strict=True)]
        rows = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            if self.task == "sequence_classification":
                rows += self._classify(chunk)
            elif self.task == "token_classification":
                rows += self._tag(chunk)
            elif self.task is None:
                rows += [{"text": t, "embedding": v.tolist(), "dimension": len(v)} for t, v in zip(chunk, self.encode(chunk))]
            else:  # a head predict.py does not interpret (masked LM): the outputs' shapes; call the model for them
                out = self(dict(self._tokenize(chunk)))
                rows += [{"text": t, "shapes": {k: list(v[i].shape) for k, v in out.items()}} for i, t in enumerate(chunk)]
        return rows

    def encode(self, sentences, batch_size: int = 32, normalize_embeddings: bool = False) -> np.ndarray:
        """Sentence embeddings (texts x dim, float32; one vector for one string), as sentence-transformers' ``encode``."""
        if self.task is not None:
            raise ValueError(f"encode is for feature-extraction artefacts (headless encoders); this one's task is {self.task}")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        vectors = [self._embed(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        result = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
        if normalize_embeddings or self.manifest.get("normalize"):
            result = result / np.maximum(np.linalg.norm(result, axis=-1, keepdims=True), 1e-12)
        return result[0] if single else result

    def _embed(self, texts: list[str]) -> np.ndarray:
        encoded = self._tokenize(texts)
        out = self(dict(encoded))
        pooling = self.manifest.get("embedding_pooling") or "mean"
        if pooling == "mean" and "sentence_embedding" in out:  # the artefact pools it already
            return out["sentence_embedding"].astype(np.float32)
        hidden, mask = out["last_hidden_state"], encoded["attention_mask"][..., None].astype(bool)
        if pooling == "cls":
            return hidden[:, 0].astype(np.float32)
        if pooling == "max":
            return np.where(mask, hidden, -np.inf).max(1).astype(np.float32)
        return ((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)).astype(np.float32)

    def _label(self, index: int) -> str:
        labels = self.manifest.get("labels") or []
        return labels[index] if index < len(labels) else str(index)

    def _classify(self, texts: list[str]) -> list[dict]:
        logits = self(dict(self._tokenize(texts)))["logits"].astype(np.float64)
        multi = self.manifest.get("problem_type") == "multi_label_classification"
        probs = 1 / (1 + np.exp(-logits)) if multi else _softmax(logits)
        rows = []
        for text, p in zip(texts, probs):
            best = int(p.argmax())
            row = {"text": text, "label": self._label(best), "score": float(p[best]), "scores": {self._label(i): float(v) for i, v in enumerate(p)}}
            if multi:
                row["labels"] = [self._label(i) for i in np.flatnonzero(p > 0.5)]
            rows.append(row)
        return rows

    def _tag(self, texts: list[str]) -> list[dict]:
        spans = [[m.span() for m in re.finditer(r"\S+", text)] for text in texts]
        encoded = self._tokenize([[text[a:b] for a, b in s] for text, s in zip(texts, spans)], is_split_into_words=True)
        probs = _softmax(self(dict(encoded))["logits"].astype(np.float64))
        labels = self.manifest.get("labels") or []
        iob2 = bool(labels) and all(name == "O" or name[:2] in ("B-", "I-") for name in labels)
        rows = []
        for row, (text, span) in enumerate(zip(texts, spans)):
            first = {}  # word -> its first sub-token; words cut off by max_length get no tag
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None:
                    first.setdefault(word, position)
            words = []
            for word, position in sorted(first.items()):
                best = int(probs[row, position].argmax())
                a, b = span[word]
                words.append({"word": text[a:b], "tag": self._label(best), "score": float(probs[row, position, best]), "start": a, "end": b})
            rows.append({"text": text, "words": words, "entities": _entities(text, words) if iob2 else None})
        return rows

    def _answer(self, question: str, context: str, batch_size: int) -> dict:
        encoded = self._tokenize(question, context, truncation="only_second", stride=max(1, self.max_length // 4),
                                 return_overflowing_tokens=True, return_offsets_mapping=True)
        windows = {k: encoded[k] for k in self.inputs if k in encoded}
        outs = [self({k: v[i:i + batch_size] for k, v in windows.items()}) for i in range(0, len(encoded["input_ids"]), batch_size)]
        starts, ends = (np.concatenate([o[k] for o in outs]).astype(np.float64) for k in ("start_logits", "end_logits"))
        best = None  # (raw logit sum, window, start token, end token, the window's context tokens)
        for w in range(len(starts)):
            context_tokens = np.array([s == 1 for s in encoded.sequence_ids(w)])
            n = len(context_tokens)
            band = np.triu(np.ones((n, n), bool)) & ~np.triu(np.ones((n, n), bool), MAX_ANSWER_TOKENS)  # s <= e < s + 30
            allowed = np.outer(context_tokens, context_tokens) & band
            if allowed.any():
                pairs = np.where(allowed, starts[w][:, None] + ends[w][None, :], -np.inf)
                s, e = np.unravel_index(int(pairs.argmax()), pairs.shape)  # the first best (s, e) on ties
                if best is None or pairs[s, e] > best[0]:
                    best = (pairs[s, e], w, int(s), int(e), context_tokens)
        if best is None:  # no context tokens: an empty context
            return {"text": context, "question": question, "answer": "", "score": 0.0, "start": None, "end": None}
        _, w, s, e, context_tokens = best
        p_start, p_end = (_softmax(np.where(context_tokens, logits[w], -np.inf)) for logits in (starts, ends))
        a, b = int(encoded["offset_mapping"][w][s][0]), int(encoded["offset_mapping"][w][e][1])
        return {"text": context, "question": question, "answer": context[a:b], "score": float(p_start[s] * p_end[e]), "start": a, "end": b}


def load(folder, *, threads: int | None = None) -> Artefact:
    return Artefact(folder, threads=threads)


def _question_error(task, question) -> str | None:
    """Why ``question`` does not fit an artefact of ``task`` (None: it does)."""
    if task == "question_answering" and question is None:
        return 'this artefact answers questions: pass a question (--question "...") and the contexts as texts'
    if task != "question_answering" and question is not None:
        return f"a question is for question-answering artefacts; this one's task is {task or 'feature extraction'}"
    return None


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _entities(text: str, words: list[dict]) -> list[dict]:
    """Entities of IOB2-tagged words, as seqeval and HF's "simple" aggregation group them.

    B-X starts an entity; I-X continues an entity of type X (and starts one after O or
    another type); O ends it. Its score is the mean of its words' tag probabilities.
    """
    groups, current = [], None
    for word in words:
        prefix, _, kind = word["tag"].partition("-")
        if prefix == "I" and current is not None and current[0] == kind:
            current[1].append(word)
        elif prefix in ("B", "I"):
            current = (kind, [word])
            groups.append(current)
        else:
            current = None
    return [{"type": kind, "score": float(np.mean([w["score"] for w in members])), "text": text[members[0]["start"]:members[-1]["end"]],
             "start": members[0]["start"], "end": members[-1]["end"]} for kind, members in groups]


def _onnx_runner(folder: Path, manifest: dict, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / manifest["model_file"]), options, providers=["CPUExecutionProvider"])
    names = manifest["inputs"]
    return lambda values: session.run(manifest["outputs"], dict(zip(names, values)))


def _aoti_runner(folder: Path, manifest: dict, threads):
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch._inductor.aoti_load_package(str(folder / manifest["model_file"]))

    def run(values):
        with torch.no_grad():
            out = model(*[torch.from_numpy(v) for v in values])
        return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    return run


def _hf_runner(folder: Path, manifest: dict, threads):
    import torch
    import transformers

    if threads:
        torch.set_num_threads(threads)
    model = getattr(transformers, manifest["hf_class"]).from_pretrained(folder).eval()

    def run(values):
        given = {name: torch.from_numpy(v) for name, v in zip(manifest["inputs"], values)}
        with torch.no_grad():
            out = model(**given)
        result = []
        for name in manifest["outputs"]:
            if name == "sentence_embedding":  # mean over the attended tokens, as sentence-transformers pools
                mask = given["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
                result.append(((out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy())
            else:
                result.append(out[name].numpy())
        return result

    return run


def _check(folder: str, inputs_file: str, outputs_file: str) -> None:
    """Run saved inputs (an .npz of ``<case>/<input>`` arrays) and save the outputs the same way."""
    model = load(folder)
    saved = np.load(inputs_file)
    cases = sorted({key.split("/")[0] for key in saved.files})
    outputs = {}
    for case in cases:
        got = model({name: saved[f"{case}/{name}"] for name in model.inputs if f"{case}/{name}" in saved.files})
        outputs.update({f"{case}/{name}": value for name, value in got.items()})
    np.savez(outputs_file, **outputs)
    print(json.dumps({"graphprune_imported": "graphprune" in sys.modules, "cases": cases}))


def _text_line(task, row: dict) -> str:
    """One text's prediction as the terminal shows it (``--json`` prints the whole row)."""
    if task == "sequence_classification":
        if "labels" in row:  # multi-label: every label over 0.5
            return f"{','.join(row['labels']) or '-'}\t{','.join(format(row['scores'][k], '.3f') for k in row['labels'])}\t{row['text']}"
        return f"{row['label']}\t{row['score']:.3f}\t{row['text']}"
    if task == "token_classification":  # the text, then an entity (or, untagged by IOB2, a word) a line
        found = row["entities"] if row["entities"] is not None else [{**w, "type": w["tag"], "text": w["word"]} for w in row["words"]]
        return "\n".join([row["text"]] + [f"{e['type']}\t{e['score']:.3f}\t{e['text']}" for e in found] + [""])
    if task == "question_answering":
        return f"{row['answer']}\t{row['score']:.3f}\t{row['text']}"
    if task is None:
        head = ", ".join(f"{v:.4f}" for v in row["embedding"][:4])
        return f"dim {row['dimension']}\t[{head}, ...]\t{row['text']}"
    return "\t".join([*(f"{k} {tuple(shape)}" for k, shape in row["shapes"].items()), row["text"]])


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--check":
        _check(argv[0], argv[2], argv[3])
        return 0
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                     epilog="also: predict.py FOLDER --check INPUTS.npz OUTPUTS.npz (saved inputs in, outputs saved)")
    parser.add_argument("folder", help="the artefact folder (the one holding artefact.json)")
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="texts to predict (question answering: the contexts)")
    parser.add_argument("--json", action="store_true", help="print JSON Lines: one object per text")
    parser.add_argument("--question", help="question-answering artefacts: the question asked of every TEXT")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:  # usage errors before the runtime loads
        task = read_manifest(args.folder).get("task")
    except ValueError as error:
        parser.error(str(error))
    if _question_error(task, args.question):
        parser.error(_question_error(task, args.question))
    model = load(args.folder, threads=args.threads)
    for row in model.predict(args.texts, args.question, batch_size=args.batch_size):
        print(json.dumps(row) if args.json else _text_line(task, row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
