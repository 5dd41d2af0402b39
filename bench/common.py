"""What every benchmark shares: its arguments, the machine line, the model and data it starts from, its claims and results.

A benchmark builds its parser with :func:`arguments`, then ``bench = Bench(args)``:
the machine line is printed, and ``bench.baseline()``, ``bench.tokenizer``,
``bench.splits``, ``bench.calibration()`` give the cached fine-tuned MiniLM, its
tokenizer and the Rotten Tomatoes splits. With ``--smoke`` the same calls give a
tiny BERT built in code, a tokenizer over its words and synthetic two-class snippets,
so that the benchmark runs its own code end to end in seconds; its numbers mean
nothing and it writes only into its ``--out`` folder, never into ``bench/results``.

``bench.claim(...)`` prints a claim in words (``speed-up within 1 point: 3.10x, claim
>= 3x: met``) and ``bench.write(name, results)`` writes the results JSON with every
claim under ``"claims"``, beside the keys the benchmark already records.
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
from pathlib import Path

from report import machine as describe_machine, machine_line, save_figure, table, write_json  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"
POSITIVE = ["good", "great", "fun", "moving", "superb"]
NEGATIVE = ["bad", "dull", "boring", "awful", "weak"]
FILLER = [f"w{i}" for i in range(60)]
# the smoke runs' stand-in for MiniLM and for bert-base: 128 positions, so that the benchmarks' 128-token batches fit
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)
SMOKE_SPLITS = {"train": (96, 0), "validation": (48, 1), "test": (48, 2)}  # snippets, seed
_TINY_GRAPHS: dict = {}  # the traced tiny BERT, once per process: exporting costs seconds even at this size


def log(*args) -> None:
    print(*args, flush=True)


def arguments(doc: str, *, quick: str | None = None) -> argparse.ArgumentParser:
    """A parser with the common options: ``--smoke``, ``--out`` (and ``--quick`` where a benchmark keeps one)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds on a tiny model built in code: the benchmark's own code end to end, meaningless numbers")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results; with --smoke a new temporary folder)")
    if quick:
        parser.add_argument("--quick", action="store_true", help=quick)
    return parser


def snippets(n: int, seed: int, name: str):
    """Two-class snippets: one sentiment word among five filler words (label 1 = positive), grouped in seven 'movies'."""
    from graphprune.training.data import TextDataset

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        words = rng.sample(FILLER, 5) + [rng.choice(POSITIVE if i % 2 else NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(i % 2)
    return TextDataset(texts, labels, ("neg", "pos"), [f"movie{i % 7}" for i in range(n)], name)


def tiny_tokenizer():
    """A WordPiece tokenizer over the snippets' words (fits TINY's vocabulary)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def tiny_config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides):
    """The tiny BertForSequenceClassification, eval mode, seeded."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**overrides)).eval()


def tiny_graph(seed: int = 0):
    """``tiny_model(seed)`` traced: a copy of the one traced in this process."""
    import graphprune

    if seed not in _TINY_GRAPHS:
        _TINY_GRAPHS[seed] = graphprune.trace(tiny_model(seed))
    return _TINY_GRAPHS[seed].copy()


# README's hand-picked pipeline (bench/search.py and bench/compress.py): K-prune at 0.3 of the FLOPs, the demo's distilled
# recovery, then int8
HAND_PICKED = {"flops": 0.3, "steps": 60, "learning_rate": 5e-5, "warmup_ratio": 0.1}


def hand_picked(base, train, tokenizer, calibration, *, steps: int = HAND_PICKED["steps"], search: dict | None = None,
                commit: bool = False, lower: dict | None = None) -> dict:
    """The hand-picked pipeline on ``base``: ``{"pruned": after K-prune, "recovered": after the recovery, "lowered": int8}``.

    ``search``: K-prune's options beside its method and FLOPs (compress.py calibrates on
    2048 examples); ``commit``: fold the masks into the weights before lowering, as the
    demo does (search.py); ``lower``: the ``lower`` pass's options beside int8.
    """
    import graphprune
    from graphprune.ir.masks import commit_masks

    options = {"method": "kprune", "flops": HAND_PICKED["flops"], "progress": False, **(search or {})}
    pruned, _ = graphprune.run_pass(base, "structured_search", options, data=calibration)
    recovered = pruned.copy()  # the caller may use the K-pruned graph as it was before the recovery
    graphprune.finetune(recovered, train, tokenizer, teacher=base, max_steps=steps, learning_rate=HAND_PICKED["learning_rate"],
                        warmup_ratio=HAND_PICKED["warmup_ratio"], progress=False)
    if commit:
        commit_masks(recovered)
    lowered, _ = graphprune.run_pass(recovered, "lower", {"precision": "int8", **(lower or {})}, data=calibration)
    return {"pruned": pruned, "recovered": recovered, "lowered": lowered}


class Bench:
    """One benchmark run: where it writes, the machine, the model and data it starts from, and its claims."""

    def __init__(self, args: argparse.Namespace, *, announce: bool = True):
        self.smoke = bool(getattr(args, "smoke", False))
        out = getattr(args, "out", None)
        if out is None:
            out = Path(tempfile.mkdtemp(prefix="graphprune-bench-smoke-")) if self.smoke else RESULTS
        if self.smoke and Path(out).resolve() == RESULTS.resolve():
            raise SystemExit("--smoke writes meaningless numbers: give it another --out than bench/results")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.claims: list[dict] = []
        self.machine = describe_machine()
        if announce:
            log(machine_line(self.machine))

    def pick(self, full, smoke):
        """``smoke`` in a smoke run, ``full`` otherwise: the one place a benchmark's sizes differ."""
        return smoke if self.smoke else full

    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 1)

    # ---- the model and data -------------------------------------------------------------------

    @functools.cached_property
    def tokenizer(self):
        from graphprune.training.models import load_tokenizer

        return tiny_tokenizer() if self.smoke else load_tokenizer("minilm")

    @functools.cached_property
    def splits(self) -> dict:
        from graphprune.training.data import load_rotten_tomatoes

        if self.smoke:
            return {split: snippets(n, seed, split) for split, (n, seed) in SMOKE_SPLITS.items()}
        return load_rotten_tomatoes()

    def baseline(self):
        """The cached fine-tuned baseline graph (the tiny traced BERT in a smoke run); built once per run."""
        if "_baseline" not in self.__dict__:
            if self.smoke:
                from graphprune.training.data import RT_LABELS

                graph = tiny_graph()
                graph.source["label_names"] = list(RT_LABELS)
                self._baseline = graph
            else:
                from graphprune.training.baseline import load_baseline

                self._baseline = load_baseline()
        return self._baseline

    def eager_model(self):
        """A fresh eager model of the baseline's architecture (MiniLM with a new head; the tiny BERT)."""
        from graphprune.training.models import load_minilm

        return tiny_model() if self.smoke else load_minilm(num_labels=2)[0]

    def large_model(self, seed: int = 0):
        """bert-base BertForSequenceClassification from a config, random weights (the tiny BERT in a smoke run)."""
        import torch
        from transformers import BertConfig, BertForSequenceClassification

        if self.smoke:
            return tiny_model(seed)
        torch.manual_seed(seed)
        return BertForSequenceClassification(BertConfig()).eval()

    def large_graph(self, seed: int = 0):
        """``large_model`` traced."""
        import graphprune

        return tiny_graph(seed) if self.smoke else graphprune.trace(self.large_model(seed))

    def user_files(self, folder: Path) -> tuple[dict, dict]:
        """The baseline as a checkpoint with its tokenizer folder, the splits as CSVs: a job's ``[model]`` and ``[data]`` tables.

        What ``graphprune search`` and ``compress`` read in a smoke run, where there is no
        cached baseline to name; the labels are written as the checkpoint's label strings.
        """
        import csv

        from graphprune.app.export.artefact import label_names

        folder = Path(folder)
        graph = self.baseline().copy()
        self.tokenizer.save_pretrained(folder / "tokenizer")
        graph.source["tokenizer"] = str(folder / "tokenizer")  # load_tokenizer reads a folder path
        graph.save(folder / "model")
        names = list(label_names(graph))
        data = {"columns": {"text": "review", "label": "sentiment"}}
        for split, dataset in self.splits.items():
            data[split] = str(folder / f"{split}.csv")
            with open(data[split], "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["review", "sentiment"])
                writer.writerows((text, names[label]) for text, label in zip(dataset.texts, dataset.labels))
        return {"checkpoint": str(folder / "model")}, data

    def calibration(self, data=None, **options):
        """Calibration batches from the training split (or ``data``)."""
        from graphprune.training.calibration import CalibrationData

        return CalibrationData(self.splits["train"] if data is None else data, self.tokenizer, **options)

    def accuracy(self, graph, data) -> float:
        import graphprune

        return graphprune.evaluate(graph, data, self.tokenizer, progress=False)["accuracy"]

    def compile(self, module):
        """``compile_module`` of ``module``; left eager in a smoke run (inductor spends tens of seconds even on a tiny graph)."""
        from graphprune.ir.runtime import compile_module

        if not self.smoke:
            compile_module(module)
        return module

    @property
    def lower_options(self) -> dict:
        """Options every ``lower`` of the run adds: a smoke run keeps the lowered graph uncompiled (see ``compile``)."""
        return {"compile": False} if self.smoke else {}

    # ---- claims and results -------------------------------------------------------------------

    def claim(self, name: str, value, target, *, met: bool | None = None, at_most: bool = False, unit: str = "",
              words: str | None = None, **extra) -> dict:
        """Record and print one claim: ``words: value, claim >= target: met``.

        ``met`` defaults to value >= target (value <= target with ``at_most``); a value of
        None is not met. ``extra`` keys are recorded with the claim.
        """
        if met is None:
            met = value is not None and not isinstance(value, str) and (value <= target if at_most else value >= target)
        entry = {"name": name, "value": value, "target": target, "met": bool(met), **extra}
        self.claims.append(entry)
        numeric = isinstance(target, (int, float)) and not isinstance(target, bool)
        bound = f"{'<=' if at_most else '>='} {_shown(target, unit)}" if numeric else str(target)
        log(f"{words or name.replace('_', ' ')}: {_shown(value, unit)}, claim {bound}: {'met' if met else 'not met'}")
        return entry

    def write(self, name: str, results: dict) -> Path:
        """``results`` with the run's claims under ``"claims"`` (and ``"smoke": true`` in a smoke run), to ``--out``/``name``."""
        path = self.out / name
        extra = {"smoke": True} if self.smoke else {}
        write_json(path, {**results, **extra, "claims": list(self.claims)})
        return path

    def figure(self, fig, name: str) -> Path:
        path = self.out / name
        save_figure(fig, path)
        return path


def _shown(value, unit: str) -> str:
    if isinstance(value, float):
        return f"{value:.2f}{unit}" if unit == "x" else f"{value:g}{unit}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}{unit}"
    return f"{value}{unit}" if value is not None else "not measured"
