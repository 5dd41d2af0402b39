"""Data-parallel fine-tuning under ``accelerate launch``: two CPU processes (gloo) train the
same model as one process with the same global batch, keep pruned weights at zero in
every rank, and write one checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphprune

from . import distributed_worker as worker

pytest.importorskip("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, processes: int = 2):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(Path(worker.__file__)), str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    done = launch(out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def gaps(state, reference) -> dict[str, float]:
    """The largest difference in each tensor of two state dicts (as the worker writes them)."""
    assert state.keys() == reference.keys()
    return {k: (torch.tensor(state[k], dtype=torch.float64) - torch.tensor(reference[k], dtype=torch.float64)).abs().max().item()
            for k in reference}


def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(two_processes, tmp_path):
    _, ranks = two_processes
    assert [r["processes"] for r in ranks] == [2, 2]
    alone = worker.run(tmp_path)
    assert alone["processes"] == 1
    assert len(alone["state"]) == len(worker.pruned_tiny_graph().module.state_dict()) > 40  # every tensor, masks too
    for rank in ranks:
        assert len(rank["losses"]) == worker.STEPS
        assert max(abs(a - b) for a, b in zip(rank["losses"], alone["losses"])) <= 1e-5
        gap = gaps(rank["state"], alone["state"])  # every parameter and buffer, 4e-8 apart at most here
        assert max(gap.values()) <= 1e-5, max(gap, key=gap.get)
    # gradients averaged: one model in both ranks, to the bit (named here: the tensors that differ)
    assert [k for k in ranks[0]["state"] if ranks[0]["state"][k] != ranks[1]["state"][k]] == []
    half = worker.run(tmp_path / "half", batch_size=worker.BATCH // 2)  # what each process computed on
    assert max(abs(a - b) for a, b in zip(half["losses"], alone["losses"])) > 1e-4  # so the comparison can tell


def test_pruned_weights_stay_zero_in_every_rank_and_one_checkpoint_is_written(two_processes):
    out, ranks = two_processes
    assert [r["masked_nonzeros"] for r in ranks] == [0, 0]
    assert ranks[0]["masked"] == ranks[1]["masked"] > 0  # the masks are there, the same in both ranks
    assert sorted(p.name for p in out.iterdir()) == ["graph", "rank0.json", "rank1.json"]  # no second or staging copy
    graph = graphprune.load(out / "graph")
    assert worker.state_of(graph) == ranks[0]["state"]
    assert worker.masked_weights(graph) == (ranks[0]["masked"], 0)


def test_a_batch_is_shared_in_order_and_one_smaller_than_the_processes_is_refused():
    from graphprune.training.finetune import _slice_for_process

    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.tensor([0, 1, -100, 1, 0])}
    parts = [_slice_for_process(batch, rank, 2, "cpu") for rank in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p, _ in parts]), batch["input_ids"])
    assert [int(terms) for _, terms in parts] == [2, 2]  # loss terms: labelled rows (-100 is ignored)
    with pytest.raises(ValueError, match="cannot be shared by 2 processes"):
        _slice_for_process({"input_ids": torch.ones(1, 4, dtype=torch.long)}, 0, 2, "cpu")


def test_ranks_other_than_0_write_no_checkpoint_and_the_cli_prints_nothing_there(tmp_path, monkeypatch, capsys):
    from graphprune.app.cli import main

    graph = worker.pruned_tiny_graph()
    monkeypatch.setenv("RANK", "1")  # as accelerate launch sets it in the second process
    graph.save(tmp_path / "graph")
    assert not (tmp_path / "graph").exists() and list(tmp_path.iterdir()) == []
    assert main(["passes"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    graph.save(tmp_path / "graph")
    assert (tmp_path / "graph" / "manifest.json").is_file()
    assert main(["passes"]) == 0
    assert "prune_weight" in capsys.readouterr().out
