"""The wheel a user installs: the pass library lives inside the graphprune namespace.

A top-level ``passes`` package would claim a name any other project may use, so the
source folder ``passes/`` installs as ``graphprune.passes``. The wheel is built from
this tree and installed into a fresh virtual environment (it borrows torch and the
other dependencies from this one), and the passes are imported from it there.
"""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source_packages() -> set[str]:
    """Every package folder of the tree, named as it installs."""
    found = set()
    for top, installed in (("graphprune", "graphprune"), ("passes", "graphprune.passes")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((installed, *parts)))
    return found


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == source_packages()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and egg-info folders beside the sources
    source = tmp_path_factory.mktemp("source") / "graphprune"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "build", "*.egg-info", "tests", "bench", "tutorials", "site", "runs", "demo-artefacts", ".make", ".pytest_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True, capture_output=True,
    )
    (found,) = out.glob("graphprune-*.whl")
    return found


def test_wheel_holds_no_top_level_passes(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"graphprune"}
    assert "graphprune/passes/pruning/prune_weight.py" in names


def test_passes_import_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    script = (
        "import importlib.util, graphprune, graphprune.passes\n"
        "from graphprune.passes.pruning.prune_weight import PruneWeightConfig\n"
        "print(graphprune.passes.__file__)\n"
        "print(importlib.util.find_spec('passes'))\n"
        "print(','.join(graphprune.list_passes()))\n"
    )
    # run outside the checkout, so the source folders are not on sys.path
    done = subprocess.run([python, "-c", script], check=True, capture_output=True, text=True, cwd=tmp_path)
    location, top_level, names = done.stdout.split()
    assert location.startswith(str(venv)), location
    assert top_level == "None"
    import graphprune  # the built-in passes here (other tests in this process may have registered their own)

    built_in = [n for n in graphprune.list_passes() if graphprune.get_pass(n).fn.__module__.startswith("graphprune.passes.")]
    assert names.split(",") == built_in
