"""Tutorial 7: search compression pipelines with Optuna, and re-run the chosen one from its run file.

"At most 1 point lost, as fast as possible on this machine": a search job names the
passes, the fields to search (a choice, a range, an integer range or a log range), the
objectives and the constraints. This tutorial:

1. writes a job: K-prune's FLOPs budget as a range, unstructured sparsity as a range
   (an optional step), objectives validation accuracy and measured latency, at most
   1 point lost on the validation split; a known pipeline (K-prune at half the FLOPs,
   no sparsity) enqueued as the first trial;
2. runs the search (TPE, a fixed seed; the study lives in a journal file beside the
   job, so stopping and rerunning resumes it; ``--workers`` or an RDB ``--storage``
   spread it over processes and machines);
3. prints the Pareto front, validation and test (the test split is used only here,
   on the front, after the search);
4. re-runs the best pipeline under the constraint from its run file, as
   ``graphprune run`` would, and reloads its checkpoint.

    python tutorials/tutorial_7_search.py [--quick]

The full run uses the cached fine-tuned baseline (built on first use) and 12 trials
(about 15 minutes on 2 cores); ``--quick`` (what the tests run) starts from MiniLM with
an untrained head and 2 small trials: it shows the workflow, not the numbers.
"""

import argparse
import tempfile
from pathlib import Path

import graphprune
from graphprune.app.run_file import run_file


def job_text(quick: bool) -> str:
    samples = "num_samples = 64\nscore_samples = 32\nreconstruct_samples = 64" if quick else "num_samples = 512"
    return f"""
[model]
name = "{'minilm' if quick else 'baseline'}"

[data]
name = "rotten_tomatoes"
eval_limit = {64 if quick else 500}
test_limit = {64 if quick else 1066}
max_length = 64

[search]
trials = {2 if quick else 12}
sampler = "tpe"
seed = 0
objectives = ["accuracy", "latency"]
constraints = {{ accuracy_drop = {50.0 if quick else 1.0} }}   # points on the validation subset
latency = {{ batch_size = 8, max_length = 128, iters = {3 if quick else 10} }}
enqueue = [{{ "structured_search.flops" = 0.5, "prune_weight.use" = false }}]   # first: a known pipeline

[[passes]]
name = "structured_search"
method = "kprune"
flops = {{ range = [0.3, 0.9], step = 0.05 }}
progress = false
{samples}

[[passes]]
name = "prune_weight"
optional = true
method = "wanda"
sparsity = {{ range = [0.1, 0.5], step = 0.1 }}
num_samples = {32 if quick else 128}
"""


def main(quick: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "search.toml"
        job.write_text(job_text(quick))
        print(f"1. the job ({job.name}):{job_text(quick)}")

        print("2. the search (a journal file beside the job keeps the study: rerunning resumes it)")
        result = graphprune.search(job, progress=not quick)

        print(f"\n3. {result['completed']} trials completed, {result['failed']} failed; prefix cache: {result['cache']}")
        if result["best"] is None:
            print("no trial met the constraint; widen the ranges or loosen it")
            return
        best = next(m for m in result["front"] if m["trial"] == result["best"])
        print(f"best under the constraint: trial {best['trial']}: {best['pipeline']}, validation accuracy {best['val_accuracy']}, "
              f"test accuracy {best['test_accuracy']}, latency {best['latency']:.3f} of the input graph's")

        print(f"\n4. re-run from its run file ({Path(best['run_file']).name}), as `graphprune run` does")
        table = run_file(best["run_file"], log=lambda *a: None)
        print(table)
        print(f"test accuracy re-run {table.rows[-1]['accuracy']} (the search reported {best['test_accuracy']})")
        again = graphprune.load(result["output"] / "best")
        print(f"best checkpoint reloaded: {len(again.module.graph.nodes)} nodes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (what the tests run)")
    main(parser.parse_args().quick)
