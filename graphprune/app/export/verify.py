"""Each artefact checked in its own runtime, in a fresh process that never imports graphprune.

The staged folder's ``predict.py --check`` runs sample inputs of two shapes; its
outputs are compared with the graph's. Float artefacts must agree within
``FLOAT_TOLERANCE``; int8 artefacts are not the float arithmetic, so their argmax
agreement and largest difference are measured and reported (their accuracy is what
``graphprune eval ARTEFACT`` measures), and they must still have the right shapes and
finite values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ...ir.errors import ExportError
from .artefact import SCRIPT, build_manifest, write_manifest, write_support_files

FLOAT_TOLERANCE = 1e-4
CHECK_TIMEOUT_S = 600


def finish_artefact(graph, folder: Path, *, caller: str, reference: dict, cases: dict, exact: bool, started: float,
                    tokenizer=None, **manifest_fields) -> dict:
    """What every format does once its model file is in the staged ``folder``.

    Writes the tokenizer files, ``predict.py`` and the manifest, checks the artefact in a
    fresh process, and records the check and the export time; returns the manifest.
    """
    has_tokenizer = write_support_files(graph, folder, tokenizer)
    manifest = build_manifest(graph, folder, tokenizer=has_tokenizer, **manifest_fields)
    write_manifest(folder, manifest)  # predict.py reads it
    manifest["verification"] = check_in_fresh_process(folder, reference, cases, exact=exact, caller=caller)
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    write_manifest(folder, manifest)
    return manifest


def check_in_fresh_process(folder: Path, reference: dict, cases: dict, *, exact: bool, caller: str) -> dict:
    """Run the artefact in ``folder`` on ``cases`` in a new interpreter and compare with ``reference``."""
    folder = Path(folder).resolve()  # the check runs in a temporary working directory
    with tempfile.TemporaryDirectory(prefix="graphprune-check-") as tmp:
        inputs, outputs = Path(tmp) / "inputs.npz", Path(tmp) / "outputs.npz"
        np.savez(inputs, **{f"{case}/{name}": value for case, given in cases.items() for name, value in given.items()})
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of graphprune's checkout on the path
        try:
            done = subprocess.run(
                [sys.executable, str(folder / SCRIPT), str(folder), "--check", str(inputs), str(outputs)],
                capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, env=env, cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise ExportError(f"{caller}: the artefact did not answer within {CHECK_TIMEOUT_S} s in a fresh process") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ExportError(f"{caller}: the artefact failed in its own runtime in a fresh process: {' | '.join(tail)}")
        status = json.loads(done.stdout.strip().splitlines()[-1])
        got = np.load(outputs)
        report = compare(reference, {key: got[key] for key in got.files}, exact=exact, caller=caller)
    report["fresh_process"] = True
    report["graphprune_imported"] = status["graphprune_imported"]
    if status["graphprune_imported"]:
        raise ExportError(f"{caller}: the artefact's check imported graphprune; an artefact must run without it")
    return report


def compare(reference: dict, got: dict, *, exact: bool, caller: str) -> dict:
    """Largest absolute difference (and argmax agreement of 2-D+ outputs) per case; raises when a float artefact is off."""
    worst, agree, total, shapes = 0.0, 0, 0, []
    for case, outputs in reference.items():
        for name, want in outputs.items():
            have = got.get(f"{case}/{name}")
            if have is None or tuple(have.shape) != tuple(want.shape):
                shape = None if have is None else tuple(have.shape)
                raise ExportError(f"{caller}: output {name!r} on input case {case} has shape {shape}, the graph's is {tuple(want.shape)}")
            if not np.isfinite(have).all():
                raise ExportError(f"{caller}: output {name!r} on input case {case} holds non-finite values")
            worst = max(worst, float(np.abs(have.astype(np.float64) - want).max()))
            if want.ndim >= 2:
                agree += int((have.argmax(-1) == want.argmax(-1)).sum())
                total += int(np.prod(want.shape[:-1]))
            shapes.append([case, name, list(want.shape)])
    report = {"max_abs_diff": worst, "argmax_agreement": agree / total if total else None, "checked": shapes}
    if exact and worst > FLOAT_TOLERANCE:
        raise ExportError(f"{caller}: the artefact's outputs differ from the graph's by {worst:.3g} (allowed {FLOAT_TOLERANCE:g})")
    return report
