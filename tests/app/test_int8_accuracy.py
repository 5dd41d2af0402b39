"""int8 keeps its fp32 source's accuracy: a tiny BERT trained here on a generated rule, then its ONNX Runtime
int8 artefacts (dynamic and static) and its lowered int8 graph, scored against the rule on examples none saw.

The rule: 15 token ids from 5..119, label 1 where most of them are below 62. Attention that averages
a below-62 feature over the sequence can learn it: 100 AdamW steps on uniformly drawn ids. It is scored
on examples near the split (5 to 10 of the 15 ids below 62), where its margins are small and int8's
errors are the first to flip a prediction; fp32 gets about 91% of them right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

import graphprune
from tests.models import TINY

pytest.importorskip("onnxruntime")

LENGTH = 15
BELOW = 62
STEPS, BATCH = 100, 32
EXAMPLES = 400
# The claim is "at most 0.5 points lost": on 400 examples, two more mistakes than fp32 makes (one is 0.25
# points). Measured: fp32 364 right; every int8 variant here, u8s8 or u8s7, 364 to 366; lowered int8 with
# 2-bit activations 314, static int8 calibrated on padding 261.
MOST_LOST = EXAMPLES // 200


def rule_examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(5, TINY["vocab_size"], size=(n, LENGTH))
    return ids, ((ids < BELOW).sum(1) > LENGTH // 2).astype(np.int64)


def near_split_examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with 5 to 10 of their ids below 62 (each count equally likely), in shuffled order."""
    generator = np.random.default_rng(seed)
    below = generator.integers(5, 11, size=n)
    ids = np.where(np.arange(LENGTH) < below[:, None], generator.integers(5, BELOW, size=(n, LENGTH)),
                   generator.integers(BELOW, TINY["vocab_size"], size=(n, LENGTH)))
    ids = np.take_along_axis(ids, generator.random((n, LENGTH)).argsort(1), axis=1)
    return ids, (below > LENGTH // 2).astype(np.int64)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, labels = (torch.from_numpy(a) for a in rule_examples(STEPS * BATCH, seed=1))
    model.train()
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        loss = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return graphprune.trace(model.eval())


def correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int((logits.argmax(-1) == labels).sum())


def test_int8_artefacts_lose_at_most_half_a_point_against_their_fp32_source(trained, tmp_path):
    import onnxruntime as ort

    ids, labels = near_split_examples(EXAMPLES, seed=2)
    assert np.array_equal(labels, ((ids < BELOW).sum(1) > LENGTH // 2))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    with torch.no_grad():
        fp32 = correct(trained.module(**{k: torch.from_numpy(v) for k, v in feed.items()})["logits"].numpy(), labels)
    assert 0.4 < labels.mean() < 0.6 and fp32 >= 0.8 * EXAMPLES  # well above the half that guessing one class gets
    calibration = [{"input_ids": row.tolist(), "labels": int(label)} for row, label in zip(*rule_examples(64, seed=3))]
    scores = {}
    for mode in ("dynamic", "static"):
        manifest = trained.export(tmp_path / mode, format="onnx", quantize=mode, data=calibration if mode == "static" else None)
        assert manifest["precision"] == "int8"
        session = ort.InferenceSession(str(tmp_path / mode / "model.onnx"), providers=["CPUExecutionProvider"])
        scores[f"onnx int8 {mode}"] = correct(session.run(["logits"], feed)[0], labels)
    # the arithmetic the AOTInductor int8 artefact compiles (test_export checks the compiled package against it)
    lowered, _ = graphprune.run_pass(trained, "lower", {"compile": False}, data=calibration)
    with torch.no_grad():
        scores["lowered int8"] = correct(lowered.module(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy(), labels)
    assert all(fp32 - score <= MOST_LOST for score in scores.values()), (fp32, scores)
