"""The default search space of ``graphprune compress``, per task, and a user's narrowing of it.

Each range comes from a benchmark on the MiniLM baseline (README, "Measured"):

* K-prune, keeping 0.12 to 0.5 of the FLOPs (optional: the search may keep the dense
  structure and only quantize). ``bench/structured.py``: K-prune keeps the baseline's test
  accuracy down to 0.4 without recovery; ``bench/search.py``: with int8 the latency keeps
  falling below 0.3 (0.2, 0.15 and 0.12 timed 1.32x, 1.51x and 1.61x as fast as 0.3), and 240
  distilled steps hold 0.12 within 2 points on validation. 0.4 and 0.5 are there for tasks
  that prune less easily than Rotten Tomatoes.
* Distilled recovery of 0, 60, 120 or 240 steps (batch 32; an epoch of Rotten Tomatoes is
  about 250) with ``bench/learned.py``'s recipe for K-prune: lr 1e-4, logits and layer-wise
  hidden states distilled; only after K-prune or Wanda (with nothing removed it would only
  cost time: 240 steps took 6 minutes of a 30-minute budget).
* Wanda at 10% to 50% of the weights, optional (``bench/search.py``'s range; ``bench/unstructured.py``:
  Wanda 50% loses nothing on its own). Its zeros make no dense kernel faster; the search
  keeps it only where it pays.
* int8 in every runtime asked for: ``lower`` with static or dynamic activations (torch and
  AOTInductor), ONNX Runtime's dynamic or static quantization (``bench/deploy.py``: the
  fastest runtime differs by model and shape, so each is tried).

The first two trials of an unnarrowed space are the benchmarks' best pipelines within a
point on validation (``bench/search.py``: K-prune 0.25 with 240 distilled steps lost 0.54
points, 0.4 with 120 steps 0.69; ``bench/deploy.py``: K-prune in AOTInductor int8 was the
fastest runtime at both shapes), in the first exported runtime asked for; the sampler
takes over from there.

Layer removal is not in the default space: K-prune removes whole attention and FFN blocks
where its scores say so, and no benchmark here has measured layer removal ahead of it
within a point.
"""

from __future__ import annotations

import copy

RUNTIMES = ("onnx", "aoti", "torch")
KPRUNE_FLOPS = {"choice": [0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]}
RECOVERY_STEPS = {"choice": [0, 60, 120, 240]}
WANDA_SPARSITY = {"range": [0.1, 0.5], "step": 0.1}
# K-prune's calibration: half its default 2048 examples (bench/deploy.py's setting), so a trial takes minutes, not more
KPRUNE_SAMPLES = {"default": {"num_samples": 1024},
                  # an embedder's in-batch similarities are sampled: fewer, wider scores (bench/tasks.py's setting)
                  "feature-extraction": {"num_samples": 1024, "score_samples": 128, "fisher_samples": 4}}
PRUNING = ("structured_search", "wanda")  # the pass ids a recovery follows
# the benchmarks' best pipelines (module docstring): K-prune FLOPs and recovery steps
FIRST_TRIALS = ({"flops": 0.25, "steps": 240}, {"flops": 0.4, "steps": 120})
RECOVERY = {"batch_size": 32, "learning_rate": 1e-4, "warmup_ratio": 0.1, "kd_hidden_weight": 1.0}


def default_space(task: str, runtimes: tuple[str, ...]) -> dict:
    """The ``[[passes]]``, ``[finetune]`` and ``[export]`` sections of the search, as a job file has them."""
    kprune = {"name": "structured_search", "optional": True, "method": "kprune", "flops": dict(KPRUNE_FLOPS), "progress": False,
              **KPRUNE_SAMPLES.get(task, KPRUNE_SAMPLES["default"])}
    wanda = {"name": "prune_weight", "id": "wanda", "optional": True, "method": "wanda", "sparsity": dict(WANDA_SPARSITY)}
    lower = {"name": "lower", "activations": {"choice": ["static", "dynamic"]}, "compile": "torch" in runtimes}
    space = {"passes": [kprune, wanda, lower],
             "finetune": {"distill": True, "max_steps": dict(RECOVERY_STEPS), **RECOVERY, "after": list(PRUNING)}}
    exported = [r for r in runtimes if r != "torch"]
    if exported:
        space["export"] = {"optional": "torch" in runtimes, "format": {"choice": exported} if len(exported) > 1 else exported[0]}
        if "onnx" in exported:
            space["export"]["quantize"] = {"choice": ["dynamic", "static"]}  # ONNX only: the other formats ignore it
    return space


def first_trials(runtimes: tuple[str, ...]) -> list[dict]:
    """``FIRST_TRIALS`` as enqueued parameter values of the default space for ``runtimes``: static int8, in AOTInductor
    where asked for, else ONNX Runtime (dynamic int8), else torch."""
    exported = [r for r in runtimes if r != "torch"]
    export = {}
    if exported:
        fmt = "aoti" if "aoti" in exported else "onnx"
        export = {**({"export.use": True} if "torch" in runtimes else {}), **({"export.format": fmt} if len(exported) > 1 else {}),
                  **({"export.quantize": "dynamic"} if "onnx" in exported else {})}
    return [{"structured_search.use": True, "structured_search.flops": t["flops"], "wanda.use": False, "finetune.max_steps": t["steps"],
             "lower.activations": "static", **export} for t in FIRST_TRIALS]


def narrowed(space: dict, user: dict) -> dict:
    """The default space with the user's sections in place of its own: a ``[[passes]]`` array, ``[finetune]`` or
    ``[export]`` the user gives replaces the default one whole (a search job's syntax)."""
    out = copy.deepcopy(space)
    for section in ("passes", "finetune", "export"):
        if section in user:
            out[section] = copy.deepcopy(user[section])
    if "export" in user and user["export"] is None:
        out.pop("export")
    if "passes" in user and "finetune" not in user:  # the default recovery follows the user's own pruning passes
        idents = {p.get("id", p.get("name")) for p in out["passes"]}
        after = [i for i in out["finetune"].pop("after") if i in idents]
        if after:
            out["finetune"]["after"] = after
    return out
