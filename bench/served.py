"""Latency as a model is served: each model in a process of its own, the processes taking turns.

In one process, runtimes that share the cores disturb each other (ONNX Runtime's and
torch's thread pools spin after their calls); a server runs one model. Here each model
is loaded by a child process (``python bench/served.py MODEL INPUTS``) that answers
"N" on its stdin with the milliseconds of N calls on its inputs (each after one untimed
call, as ``time_interleaved`` settles), and :func:`time_served` asks each child in turn,
a few calls at a time, so the machine's load moves hit every model alike. MODEL is a
graphprune checkpoint folder (run in torch) or an artefact folder (run in its own runtime).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


class Served:
    """One model in a child process of its own."""

    def __init__(self, folder: Path, inputs: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        self.process = subprocess.Popen([sys.executable, str(HERE / "served.py"), str(folder), str(inputs), str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        ready = self.process.stdout.readline()
        if not ready.startswith("ready"):
            raise RuntimeError(f"{folder}: the serving process did not start ({ready!r})")

    def calls(self, n: int) -> list[float]:
        self.process.stdin.write(f"{n}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def time_served(folders: dict, inputs: dict, calls: int, per_turn: int, threads: int, work: Path) -> dict:
    """``{name: median ms}``: ``calls`` timed calls of each model, ``per_turn`` at a time, the models in turn."""
    path = work / f"inputs_{abs(hash(tuple(inputs))) % 10**8}.npz"
    np.savez(path, **{k: np.asarray(v, dtype=np.int64) for k, v in inputs.items()})
    servers = {name: Served(folder, path, threads) for name, folder in folders.items()}
    times = {name: [] for name in folders}
    try:
        for server in servers.values():  # warm-up: first calls allocate and tune
            server.calls(3)
        while min(len(t) for t in times.values()) < calls:
            for name, server in servers.items():
                times[name] += server.calls(per_turn)
    finally:
        for server in servers.values():
            server.close()
    return {name: statistics.median(t[:calls]) for name, t in times.items()}


def _serve(folder: str, inputs: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    feeds = dict(np.load(inputs))
    if (Path(folder) / "graph.json").exists():
        import graphprune

        module = graphprune.load(folder).module.eval()
        given = {k: torch.as_tensor(v) for k, v in feeds.items()}

        def call():
            with torch.no_grad():
                module(**given)
    else:
        from graphprune.app.export import load_artefact

        artefact = load_artefact(folder, threads=threads)
        mine = {k: v for k, v in feeds.items() if k in artefact.inputs}

        def call():
            artefact(mine)
    call()
    print("ready", flush=True)
    for line in sys.stdin:
        out = []
        for _ in range(int(line)):
            call()  # settle: the timed call sees the runtime as a server that has been answering
            started = time.perf_counter()
            call()
            out.append((time.perf_counter() - started) * 1e3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
