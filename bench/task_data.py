"""The data and job files of ``bench/tasks.py``: Rotten Tomatoes as a user's CSVs, BBC News as pairs and as retrieval.

Every data set here is written as CSV files plus a job file (``[model]`` and
``[data]``, as ``graphprune run`` reads them), and read back through the user path
(``graphprune.app.job_inputs.load_inputs``): the benchmark exercises what a user runs.

- Rotten Tomatoes: the built-in splits, written with the user's own column names
  (``review``, ``sentiment``, ``movie``) and label strings of their own (``neg``/``pos``,
  named in the job's ``label_names``, index = the baseline's class id).
- BBC headline/article pairs: articles split as ``load_bbc_news`` splits them (seeded,
  by article, deduplicated); each article gives a true pair (its own headline) and a
  hard negative: the headline, among the other articles of the same category *in the
  same split*, whose TF-IDF vector is most similar to this article's body (so no
  headline crosses splits). Labels ``match``/``other``.
- BBC retrieval: each validation or test article's headline is a query and its body the
  document; the unlabelled texts that calibrate and distil are the train articles'
  headlines and bodies only (checked: none is a retrieval text).

Also here: the fine-tuned pair classifier, cached like the baseline (``pair_model``),
the latency helpers (one batch per shape, a call per row, interleaved timing) and
each task's figure.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

import graphprune
from graphprune.ir.errors import CheckpointError
from graphprune.training.data import BBC_LABELS, load_bbc_news, load_rotten_tomatoes
from graphprune.training.models import load_tokenizer, minilm_path
from graphprune.training.timing import time_interleaved
from report import save_figure  # bench/report.py

SPLITS = ("train", "validation", "test")
SHAPES = {"b32x128": (32, 128), "b1x16": (1, 16)}  # latency: batch x tokens
EAGER, INT8 = "torch eager fp32", "ort int8 dynamic"  # the runtimes of every row; dense in each is a reference
RT_NAMES = ("neg", "pos")  # the user's label strings: index = the baseline's class id (0 rotten, 1 fresh)
PAIR_LABELS = ("other", "match")


def write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_job(folder: Path, name: str, model: dict, data: dict) -> Path:
    """A job file of ``[model]`` and ``[data]`` tables (strings, lists and one inline ``columns`` table)."""

    def value(v) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = []
    for section, table in (("model", model), ("data", data)):
        lines += [f"[{section}]", *(f"{k} = {value(v)}" for k, v in table.items()), ""]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def subset_splits(splits: dict, sizes: dict | None) -> dict:
    return splits if not sizes else {s: d.subset(sizes[s]) for s, d in splits.items()}


def rt_user_files(folder: Path, hf_folder: Path, sizes: dict | None) -> Path:
    """Rotten Tomatoes as the user's CSVs (own columns and label strings) and a job file naming the ``hf`` folder."""
    splits = subset_splits(load_rotten_tomatoes(), sizes)
    for split, d in splits.items():
        write_csv(folder / f"rt_{split}.csv", ["review", "sentiment", "movie"],
                  ((text, RT_NAMES[label], movie) for text, label, movie in zip(d.texts, d.labels, d.groups)))
    data = {s: f"rt_{s}.csv" for s in SPLITS} | {"group": "movie", "columns": {"text": "review", "label": "sentiment"}}
    return write_job(folder, "rt_user", {"path": str(hf_folder), "label_names": list(RT_NAMES)}, data)


def rt_builtin_job(folder: Path) -> Path:
    return write_job(folder, "rt_builtin", {"name": "baseline"}, {"name": "rotten_tomatoes"})


def bbc_articles(sizes: dict | None) -> dict[str, list[dict]]:
    """``{split: [{"id", "category", "headline", "body"}]}``: load_bbc_news's seeded split by article.

    load_bbc_news drops repeated files; the corpus also has the same story under two
    headlines, or one headline over two versions of a story: an article whose headline
    or body was already seen (train first, then validation, then test) is dropped too,
    so that no headline and no body is in two splits.
    """
    out, seen = {}, set()
    splits = subset_splits(load_bbc_news(), sizes)
    for split in SPLITS:
        d, rows = splits[split], []
        for text, label, group in zip(d.texts, d.labels, d.groups):
            headline, _, body = text.partition("\n")
            headline, body = headline.strip(), " ".join(body.split())
            if headline and body and not {("h", headline), ("b", body)} & seen:
                seen |= {("h", headline), ("b", body)}
                rows.append({"id": group, "category": BBC_LABELS[label], "headline": headline, "body": body})
        out[split] = rows
    return out


def hard_negatives(articles: list[dict]) -> list[int]:
    """For each article, the index of the other article (same category where one exists) whose headline's
    TF-IDF vector is most similar to this article's body."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit([a["headline"] + " " + a["body"] for a in articles])
    headlines, bodies = vectorizer.transform([a["headline"] for a in articles]), vectorizer.transform([a["body"] for a in articles])
    similarity = (bodies @ headlines.T).toarray()  # rows: bodies, columns: headlines (both L2-normalised)
    category = np.array([a["category"] for a in articles])
    text = np.array([a["headline"] for a in articles])
    picked = []
    for i, article in enumerate(articles):
        other = text != article["headline"]  # never the article's own headline, nor a copy of it
        allowed = other & (category == article["category"]) if (other & (category == article["category"])).any() else other
        picked.append(int(np.where(allowed, similarity[i], -np.inf).argmax()))
    return picked


def pair_files(folder: Path, sizes: dict | None) -> tuple[dict[str, Path], str]:
    """The pair CSVs of every split, and a digest of their contents (what a cached model was trained on)."""
    articles, files, digest = bbc_articles(sizes), {}, hashlib.sha256()
    for split in SPLITS:
        rows = []
        for article, negative in zip(articles[split], hard_negatives(articles[split])):
            rows.append((article["headline"], article["body"], "match", article["id"]))
            rows.append((articles[split][negative]["headline"], article["body"], "other", article["id"]))
        files[split] = folder / f"pairs_{split}.csv"
        write_csv(files[split], ["headline", "article", "match", "article_id"], rows)
        digest.update(files[split].read_bytes())
    return files, digest.hexdigest()[:16]


PAIR_COLUMNS = {"text": "headline", "text_pair": "article", "label": "match"}


def pair_job(folder: Path, checkpoint: Path) -> Path:
    data = {s: f"pairs_{s}.csv" for s in SPLITS} | {"group": "article_id", "columns": PAIR_COLUMNS}
    return write_job(folder, "pairs", {"checkpoint": str(checkpoint)}, data)



def pair_model(checkpoint: Path, files: dict, digest: str, recipe: dict, log):
    """The fine-tuned pair classifier: cached at ``checkpoint``, rebuilt when missing or trained on other pairs."""
    try:
        graph = graphprune.load(checkpoint)
        if graph.meta.get("pairs", {}).get("data") == digest and graph.meta["pairs"].get("recipe") == recipe:
            return graph
        log(f"  {checkpoint} was fine-tuned on other pairs or with another recipe: rebuilding it")
    except CheckpointError:
        log(f"  {checkpoint} is not cached: fine-tuning MiniLM on the pairs ({recipe})")
    data = graphprune.load_data("text-classification", **{s: str(f) for s, f in files.items()}, columns=PAIR_COLUMNS,
                                label_names=list(PAIR_LABELS), log=lambda *args: None).splits
    graph = graphprune.load_model(minilm_path(), task="text-classification", label_names=list(PAIR_LABELS), log=lambda *args: None)
    started = time.perf_counter()
    tokenizer = load_tokenizer(graph.source["tokenizer"])
    result = graphprune.finetune(graph, data["train"], tokenizer, eval_data=data["validation"], progress=False, **recipe)
    graph.meta["pairs"] = {"data": digest, "recipe": recipe, "steps": result.steps, "validation": result.evaluations,
                           "train_seconds": round(time.perf_counter() - started, 1)}
    graph.save(checkpoint)
    log(f"  fine-tuned {result.steps} steps in {graph.meta['pairs']['train_seconds']:.0f} s; saved {checkpoint}")
    return graph


def retrieval_job(folder: Path, model_path: Path, sizes: dict | None) -> Path:
    """Unlabelled train texts, validation and test query/document pairs; a job file naming the embedder's folder."""
    articles = bbc_articles(sizes)
    train = [t for a in articles["train"] for t in (a["headline"], a["body"])]
    write_csv(folder / "retrieval_train.csv", ["text"], ([t] for t in train))
    held_out = set()
    for split in ("validation", "test"):
        write_csv(folder / f"retrieval_{split}.csv", ["query", "document"], ((a["headline"], a["body"]) for a in articles[split]))
        held_out |= {t for a in articles[split] for t in (a["headline"], a["body"])}
    shared = held_out & set(train)
    if shared:
        raise ValueError(f"{len(shared)} calibration texts are also retrieval texts, e.g. {next(iter(shared))[:80]!r}")
    # graphprune's own column names: a renamed optional column would be required in every file, the train file too
    data = {s: f"retrieval_{s}.csv" for s in SPLITS}
    return write_job(folder, "retrieval", {"path": str(model_path)}, data)


def shape_inputs(tokenizer, texts: list[str], pairs: list[str] | None = None, short: list[str] | None = None) -> dict:
    """A batch per shape from the test texts (repeated where there are fewer); ``short``: other texts for 1 x 16."""
    out = {}
    for name, (rows, length) in SHAPES.items():
        first = short if short is not None and rows == 1 else texts
        segments = [first] + ([pairs] if pairs and first is texts else [])
        segments = [(s * (rows // len(s) + 1))[:rows] for s in segments]
        out[name] = dict(tokenizer(*segments, padding="max_length", truncation=True, max_length=length, return_tensors="np"))
    return out


def runner(model, inputs: dict):
    """A zero-argument call of a graph (torch eager) or an artefact folder (its runtime) on ``inputs``."""
    if isinstance(model, Path):
        artefact = graphprune.load_artefact(model, threads=torch.get_num_threads())
        feeds = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items() if k in artefact.inputs}
        return lambda: artefact(feeds)
    given = {k: torch.as_tensor(v) for k, v in inputs.items()}
    return lambda: graph_call(model, given)


@torch.no_grad()
def graph_call(graph, given):
    return graph.module(**given)


def time_rows(rows: list[dict], models: list, inputs: dict, iters: dict, warmup: int = 2) -> None:
    """Every row's latency at each shape, all interleaved; speed-ups against the dense eager and dense int8 rows."""
    eager = next(i for i, r in enumerate(rows) if (r["model"], r["runtime"]) == ("dense", EAGER))
    int8 = next(i for i, r in enumerate(rows) if (r["model"], r["runtime"]) == ("dense", INT8))
    for shape, given in inputs.items():
        ms = time_interleaved({i: runner(m, given) for i, m in enumerate(models)}, iters=iters[shape], warmup=warmup)
        for i, row in enumerate(rows):
            row[f"ms_{shape}"] = ms[i]
            row[f"vs_eager_{shape}"] = ms[eager] / ms[i]
            row[f"vs_ort_int8_{shape}"] = ms[int8] / ms[i]


def plot(name: str, result: dict, path: Path, within_points: float) -> None:
    """Rotten Tomatoes: each row's test accuracy, user path beside built-in; the others: test metric against speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows, metric = result["rows"], result["metric"]
    if "identity" in result:
        checks = result["identity"]
        ax.bar(range(len(rows)), [r["test"] for r in rows], color=["C0" if r["path"] == "user" else "C2" for r in rows])
        ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['path']} path\n{r['runtime']}" for r in rows], fontsize=7)
        for i, r in enumerate(rows):
            ax.annotate(f"{r['test']:.4f}\n{r['vs_eager_b32x128']:.2f}x", (i, r["test"]), ha="center", va="bottom", fontsize=7)
        low = min(r["test"] for r in rows)
        ax.set_ylim(low - 0.02, max(r["test"] for r in rows) + 0.02)
        ax.set_title(f"Rotten Tomatoes: user path vs built-in path ({sum(checks.values())}/{len(checks)} identity checks met)")
    else:
        for runtime, marker in ((EAGER, "o"), (INT8, "s")):
            points = [r for r in rows if r["runtime"] == runtime]
            ax.scatter([r["vs_eager_b32x128"] for r in points], [r["test"] for r in points], marker=marker, label=runtime)
            for r in points:
                steps = f", {r['recovery_steps']} steps" if r.get("recovery_steps") else ""
                ax.annotate(f"{r['model']}{steps}", (r["vs_eager_b32x128"], r["test"]), fontsize=7)
        dense = next(r["test"] for r in rows if (r["model"], r["runtime"]) == ("dense", EAGER))
        ax.axhline(dense, color="grey", linestyle=":", linewidth=1, label="dense fp32")
        ax.axhline(dense - within_points / 100, color="red", linestyle=":", linewidth=1, label="1 point below dense")
        ax.set_xlabel("speed-up vs dense torch fp32 eager (batch 32 x 128 tokens)")
        ax.set_title(f"{name}: dense and K-prune, torch fp32 and ONNX Runtime int8")
        ax.legend(fontsize=8)
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
