"""Tutorial 8: compress your own model on your own data: a classifier from its folder and CSV files, and an embedder.

Everything so far started from graphprune's built-in names (``minilm``, ``baseline``,
``rotten_tomatoes``). Your model is a ``save_pretrained`` folder and your data are
files with your column names and your label strings. This tutorial:

Part 1, a classifier and its CSV files, compressed by a job file:

1. writes the Rotten Tomatoes snippets as a user would have them: ``review`` and
   ``verdict`` columns, verdicts "fresh" or "rotten", a train file and a test file
   (the validation split is cut from train by the job);
2. saves the model as a ``save_pretrained`` folder, and reads its config's
   ``id2label``: real names travel with the folder; HF's ``LABEL_0``, ``LABEL_1``
   placeholders do not say which verdict is which id, so then the job must say it
   (``label_names``), and a job that does not is refused before any weights load;
3. writes the job: ``[model] path``, ``[data] train/test/columns``, the K-prune
   search at half the FLOPs, distillation from the dense model as recovery, and an
   int8 ONNX artefact; runs it as ``graphprune run job.toml`` does, printing the
   results table and the artefact's accuracy in ONNX Runtime;
4. runs the artefact's own ``predict.py`` (no graphprune needed) on a few texts.

Part 2, all-MiniLM-L6-v2 as what it is, a sentence embedder (no labels at all):

5. loads its folder: feature extraction, mean pooling and normalisation are read from
   its sentence-transformers files (``modules.json``, ``1_Pooling/config.json``);
6. writes unlabelled texts (``text``) and query/document pairs (``query``,
   ``document``: a snippet's first words and the whole snippet) as CSV files from
   different splits, read with ``graphprune.load_data("feature-extraction", ...)``;
7. prunes it with K-prune (the dense model's view of the texts is the target),
   recovers it by embedding distillation toward the dense model, and compares
   retrieval (recall@1, MRR@10), the mean cosine to the dense embeddings and the
   parameter counts.

    python tutorials/tutorial_8_your_model_and_data.py [--quick]

The full run works in ``runs/tutorial_8`` (kept, to look at the files), exports the
cached fine-tuned baseline (built on first use, about 15 minutes) as the user's folder,
and uses the whole splits with an epoch of recovery in each part (tens of minutes on 2
cores). ``--quick`` (what the tests run) works in a temporary folder, starts from MiniLM
with an untrained head, and uses few examples, short inputs and a few steps: it shows
the workflow, not the numbers.
"""

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import graphprune
from graphprune.app.job_inputs import load_inputs
from graphprune.app.run_file import read_job, run_file
from graphprune.training.baseline import load_baseline
from graphprune.training.calibration import CalibrationData
from graphprune.training.data import load_rotten_tomatoes
from graphprune.training.models import load_minilm, load_tokenizer, minilm_path
from graphprune.training.user_model import inspect_model

TEXTS = ["a gripping, beautifully acted film", "two hours of my life I will never get back", "the plot collapses under its own weight"]


def say(text) -> None:
    """graphprune's own log lines, indented under the step that printed them."""
    print(textwrap.indent(str(text), "   "))


def write_csv(file: Path, header: list[str], rows) -> int:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return sum(1 for _ in open(file)) - 1


def save_model_folder(folder: Path, quick: bool) -> None:
    """The user's model: the fine-tuned baseline exported for HF, or (--quick) MiniLM with a new 2-label head."""
    if quick:
        model, tokenizer = load_minilm(num_labels=2)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print(f"   --quick: MiniLM with a new (untrained) 2-label head, model.save_pretrained({folder.name}/)")
    else:
        baseline = load_baseline()
        baseline.export(folder, format="hf", tokenizer=load_tokenizer("minilm"))
        print(f"   the cached fine-tuned baseline, graph.export({folder.name}/, format='hf')")


def job_text(work: Path, model: Path, label_names, quick: bool) -> str:
    labels = f"label_names = {json.dumps(label_names)}   # id 0, id 1: the config only says LABEL_0, LABEL_1\n" if label_names else ""
    samples = "num_samples = 16\nscore_samples = 8\nreconstruct_samples = 16\n" if quick else ""
    steps = "max_steps = 2\nbatch_size = 8" if quick else "epochs = 1.0\nbatch_size = 32"
    return f"""[model]
path = "{model.name}"            # relative to this file's folder
task = "text-classification"
{labels}
[data]
train = "data/reviews_train.csv"
test = "data/reviews_test.csv"   # no validation file: validation_share of train is cut off, seeded
columns = {{ text = "review", label = "verdict" }}
eval_split = "test"
{'eval_limit = 16' if quick else ''}
max_length = {32 if quick else 64}

[[passes]]
name = "structured_search"
method = "kprune"
flops = 0.5
progress = false
{samples}
[finetune]
distill = true                   # the dense model is the teacher
{steps}
progress = false

[[export]]
path = "{work / 'artefacts' / 'reviews-int8'}"   # an export path is not relative to the job file: absolute here
format = "onnx"
quantize = "dynamic"
"""


def part_1(work: Path, quick: bool) -> None:
    splits = load_rotten_tomatoes()
    train = splits["train"].subset(200) if quick else splits["train"]
    test = splits["test"].subset(16) if quick else splits["test"]
    names = splits["train"].label_names  # ("rotten", "fresh"): the snippets' ids

    print("\n1. your data: CSV files with your own column names and label strings")
    n_train = write_csv(work / "data" / "reviews_train.csv", ["review", "verdict"], ((t, names[y]) for t, y in zip(train.texts, train.labels)))
    n_test = write_csv(work / "data" / "reviews_test.csv", ["review", "verdict"], ((t, names[y]) for t, y in zip(test.texts, test.labels)))
    with open(work / "data" / "reviews_train.csv") as handle:
        head = [next(handle).rstrip() for _ in range(3)]
    print(f"   data/reviews_train.csv ({n_train} rows), data/reviews_test.csv ({n_test} rows); the first lines:")
    print("\n".join(f"     {line[:90]}" for line in head))

    print("\n2. your model: a save_pretrained folder")
    folder = work / "my-classifier"
    save_model_folder(folder, quick)
    id2label = json.loads((folder / "config.json").read_text()).get("id2label")
    info = inspect_model(folder)
    written = f"id2label {id2label}" if id2label else "no id2label (HF's default applies)"
    print(f"   config.json: architectures {info.architecture}, {written}: labels {list(info.label_names)}")
    if info.placeholder_labels:
        label_names = list(names)
        print(f"   placeholders: the folder does not say which verdict id 0 is, so the job says it: label_names = {label_names}")
    else:
        label_names = None
        print(f"   real names: they travel with the folder; the job needs no label_names ({list(info.label_names)})")

    print("\n3. the job file, run as `graphprune run job.toml` runs it")
    if label_names:  # the same job without the names is refused when its inputs load, before any weights do
        unnamed = work / "no_names.toml"
        unnamed.write_text(job_text(work, folder, None, quick))
        spec = read_job(unnamed)
        try:
            load_inputs(unnamed, spec["model"], spec["data"], log=lambda *a: None)
            print("   without label_names: accepted (?)")
        except ValueError as error:
            print(f"   without label_names: refused: {str(error).splitlines()[0]}")
            print("   (the names go in the model's own id order: for the fine-tuned baseline id 0 is rotten)")
    job = work / "job.toml"
    job.write_text(job_text(work, folder, label_names, quick))
    print(f"   {job.name}:")
    print("\n".join(f"     {line}" for line in job.read_text().splitlines() if line.strip()))
    started = time.perf_counter()
    table = run_file(job, log=say)  # prints the data checks, the results table and the artefact's line
    print(f"   the job ran in {time.perf_counter() - started:.0f} s; stages: {[row['stage'] for row in table.rows]}")

    print("\n4. the artefact predicts, without graphprune: python <artefact>/predict.py <artefact> TEXT ...")
    artefact = work / "artefacts" / "reviews-int8"
    manifest = json.loads((artefact / "artefact.json").read_text())
    print(f"   {artefact.name}/: {', '.join(sorted(p.name for p in artefact.iterdir()))}")
    print(f"   artefact.json: artefact {manifest['artefact']}, precision {manifest.get('precision')}, labels {manifest['labels']}")
    done = subprocess.run([sys.executable, str(artefact / "predict.py"), str(artefact), *TEXTS], capture_output=True, text=True, timeout=300)
    print("   predict.py printed:" + (f" (exit status {done.returncode})" if done.returncode else ""))
    print("\n".join(f"     | {line}" for line in (done.stdout or done.stderr).rstrip().splitlines()))


def part_2(work: Path, quick: bool) -> None:
    print("\n5. all-MiniLM-L6-v2 as it ships: a sentence-transformers folder")
    dense = graphprune.load_model(minilm_path(), log=say)  # logs what it loaded
    tokenizer = load_tokenizer(dense.source["tokenizer"])
    print(f"   inferred: task {dense.source['task']}, pooling {dense.source['pooling']}, normalised {dense.source['normalize']} "
          "(modules.json lists Transformer, Pooling, Normalize; 1_Pooling/config.json: mean tokens)")

    print("\n6. your embedder's data: unlabelled texts to compress with, query/document pairs to score retrieval")
    splits = load_rotten_tomatoes()
    texts = splits["train"].texts[: 128 if quick else None]
    documents = splits["test"].texts[: 32 if quick else None]  # another split than the texts'
    pairs = [(" ".join(d.split()[:5]), d) for d in documents]
    write_csv(work / "embedder" / "texts.csv", ["text"], ([t] for t in texts))
    write_csv(work / "embedder" / "pairs.csv", ["query", "document"], pairs)
    data = graphprune.load_data("feature-extraction", train=work / "embedder" / "texts.csv", test=work / "embedder" / "pairs.csv",
                                log=say)
    retrieval, unlabelled = data.splits["test"], data.splits["train"]
    print(f"   {len(retrieval.queries)} pairs, e.g. query {retrieval.queries[0]!r} -> document {retrieval.documents[0][:60]!r}...")

    print("\n7. compress it without labels: K-prune, then distillation toward the dense embeddings")
    score = dict(tokenizer=tokenizer, max_length=64, progress=False, reference=dense)
    # an embedder's Fisher is of each text's similarities to the other texts of its batch (32): fisher_samples draws each
    # (full: fewer examples than the defaults, which take long on 2 cores for an embedder)
    options = {"num_samples": 32, "score_samples": 32, "reconstruct_samples": 32, "fisher_samples": 2} if quick else \
        {"num_samples": 512, "score_samples": 128, "reconstruct_samples": 256}
    pruned, info = graphprune.run_pass(dense, "structured_search", {"method": "kprune", "flops": 0.5, "progress": False, **options},
                                       data=CalibrationData(unlabelled, tokenizer, max_length=64))
    print(f"   kprune 0.5: heads {info['heads_per_layer']}, FFN widths {info['ffn_width_per_layer']} (searched in {info['seconds']:.0f} s)")
    rows = [("dense", dense, graphprune.evaluate(dense, retrieval, **score)),
            ("kprune, 50% of the FLOPs", pruned, graphprune.evaluate(pruned, retrieval, **score))]
    recovered = pruned.copy()
    steps = {"max_steps": 4, "batch_size": 16, "learning_rate": 1e-4} if quick else {"epochs": 1.0, "batch_size": 32, "learning_rate": 1e-4}
    started = time.perf_counter()
    result = graphprune.finetune(recovered, unlabelled, tokenizer, teacher=dense, max_length=64, progress=False, **steps)
    print(f"   distillation: {result.steps} steps on {len(unlabelled)} unlabelled texts, loss (1 - cosine) "
          f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f} ({time.perf_counter() - started:.0f} s)")
    rows.append(("+ embedding distillation", recovered, graphprune.evaluate(recovered, retrieval, **score)))

    width = max(len(r[0]) for r in rows)
    print(f"\n   {'embedder'.ljust(width)}  recall@1  mrr@10  mean cosine to dense   params   ({len(retrieval.queries)} queries)")
    for stage, graph, metrics in rows:
        params = graphprune.count_parameters(graph)[0]
        print(f"   {stage.ljust(width)}  {metrics['recall@1']:8.4f}  {metrics['mrr@10']:6.4f}  {metrics['mean_cosine']:19.4f}  {params:9,}")


def main(quick: bool) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tutorial_8-") if quick else contextlib.nullcontext("runs/tutorial_8") as folder:
        work = Path(folder).resolve()
        work.mkdir(parents=True, exist_ok=True)
        print(f"work folder: {work}" + (" (temporary, removed at the end)" if quick else " (kept)"))
        part_1(work, quick)
        middle = time.perf_counter()
        part_2(work, quick)
    end = time.perf_counter()
    print(f"\ntutorial 8 done in {end - started:.0f} s (part 1: {middle - started:.0f} s, part 2: {end - middle:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM with an untrained head, few examples and steps (used by the tests)")
    main(parser.parse_args().quick)
