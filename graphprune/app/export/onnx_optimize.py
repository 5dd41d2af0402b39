"""ONNX Runtime's transformer optimizer, used only where its fused graph computes what the graph does.

``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` fuses
attention, LayerNorm, GELU and the embedding layer. It finds the heads of each
attention from the Reshape shapes (``num_heads = 0``: detected), which transformers
5's ``view(..., -1, head_dim)`` and graphprune's uneven heads may defeat; so the
fused model is run beside the unfused one on the check inputs and kept only when
they agree within the float tolerance. Otherwise the unfused graph stays and the
manifest says why.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from .verify import FLOAT_TOLERANCE


def _session(file: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])


def _outputs(session, cases) -> list[np.ndarray]:
    return [value for given in cases.values() for value in session.run(None, given)]


def try_optimize(file: Path, cases: dict, *, enabled: bool) -> dict:
    """Replace ``file`` by its fused graph when that is correct; returns what happened, for the manifest."""
    if not enabled:
        return {"used": False, "reason": "optimize = false"}
    from onnxruntime.transformers.optimizer import optimize_model

    fused_file = file.with_name(f".fused-{uuid.uuid4().hex[:8]}.onnx")
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every fusion it tries at WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimized = optimize_model(str(file), model_type="bert", num_heads=0, hidden_size=0)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        if not fused:
            return {"used": False, "reason": "the optimizer found nothing to fuse"}
        optimized.save_model_to_file(str(fused_file))
        plain, candidate = _outputs(_session(file), cases), _outputs(_session(fused_file), cases)
        worst = max(float(np.abs(a - b).max()) for a, b in zip(plain, candidate))
        if worst > FLOAT_TOLERANCE:
            return {"used": False, "fused": fused, "max_abs_diff": worst,
                    "reason": f"the fused graph's outputs differ from the unfused one's by {worst:.3g}; left unfused"}
        os.replace(fused_file, file)
        return {"used": True, "fused": fused, "max_abs_diff": worst}
    except Exception as error:  # the optimizer is best effort: a graph it cannot handle stays unfused
        return {"used": False, "reason": f"the optimizer failed ({type(error).__name__}: {str(error)[:200]}); left unfused"}
    finally:
        quiet.setLevel(level)
        fused_file.unlink(missing_ok=True)
