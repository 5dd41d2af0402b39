"""Run a model that graphprune exported, without graphprune.

Every artefact folder carries a copy of this file as ``predict.py``::

    python predict.py FOLDER "a gripping film" "two hours I will not get back"
    python predict.py FOLDER --check INPUTS.npz OUTPUTS.npz

The first prints each text's label and probabilities (or its embedding's size); the
second runs saved inputs and writes the outputs, which is how ``graphprune export``
checks an artefact in a fresh process before it reports success. From Python::

    from predict import load
    model = load("artefacts/minilm-int8")
    outputs = model({"input_ids": ids, "attention_mask": mask})   # numpy arrays by output name

It imports only the artefact's own runtime: ``onnxruntime`` (format ``onnx``),
``torch`` (``aoti``: ``torch._inductor.aoti_load_package``) or ``transformers``
(``hf``: ``from_pretrained``), plus numpy, and ``transformers``' tokenizer for texts.
It must never import graphprune: keep it standalone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

MANIFEST = "artefact.json"
FORMAT = "graphprune-artefact"


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
    """An exported model in its own runtime: call it with a dict of integer arrays."""

    def __init__(self, folder, *, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.inputs = list(self.manifest["inputs"])
        self.outputs = list(self.manifest["outputs"])
        loader = {"onnx": _onnx_runner, "aoti": _aoti_runner, "hf": _hf_runner}[self.manifest["artefact"]]
        self._run = loader(self.folder, self.manifest, threads)

    def __call__(self, inputs: dict) -> dict[str, np.ndarray]:
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        given = {name: np.asarray(inputs[name], dtype=np.int64) for name in self.inputs if inputs.get(name) is not None}
        # Absent optional inputs are filled as the model fills them: every token attended, segment 0.
        given.setdefault("attention_mask", np.ones_like(ids))
        given.setdefault("token_type_ids", np.zeros_like(ids))
        values = self._run([given[name] for name in self.inputs])
        return dict(zip(self.outputs, values))

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not (self.folder / "tokenizer_config.json").is_file():
            raise ValueError(f"{self.folder} holds no tokenizer files; tokenise the texts yourself")
        return AutoTokenizer.from_pretrained(self.folder)


def load(folder, *, threads: int | None = None) -> Artefact:
    return Artefact(folder, threads=threads)


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


def _predict(folder: str, texts: list[str]) -> None:
    model = load(folder)
    tokenizer = model.tokenizer()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=model.manifest.get("max_length") or 128, return_tensors="np")
    outputs = model(dict(encoded))
    labels = model.manifest.get("labels") or []
    for i, text in enumerate(texts):
        if "logits" in outputs and outputs["logits"].ndim == 2:
            logits = outputs["logits"][i]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            best = int(probs.argmax())
            name = labels[best] if best < len(labels) else str(best)
            print(f"{name}\t{probs[best]:.3f}\t{text}")
        else:
            shapes = ", ".join(f"{k} {tuple(v[i].shape)}" for k, v in outputs.items())
            print(f"{shapes}\t{text}")


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "--check":
        _check(argv[0], argv[2], argv[3])
        return 0
    if len(argv) >= 2 and not argv[1].startswith("--"):
        _predict(argv[0], argv[1:])
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
