"""The documentation is checked like code: its snippets run, its job files parse, its words are the product's.

Every ```python block of README.md and of the pages under docs/ runs here, page by
page in one namespace, in a fresh copy of a folder holding a tiny ``my-model`` and
``train.csv`` / ``validation.csv`` / ``test.csv`` (tests/docs_workspace.py). A block
that cannot run here says why on the line before it:
``<!-- docs-test: skip (needs the shipped MiniLM and an hour) -->``; at most a quarter
may. A block that only includes a file (``--8<-- "tutorials/..."``, the tutorials page)
is that file, run by its own tests, so it is neither run nor counted here. Every
```toml block is read by the reader of the file it is (pipeline, job, search job or
compress job). The site itself builds with ``mkdocs build --strict``
in CI (``make docs``) and in the last test here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .docs_workspace import build_workspace

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None  # the reason, when tagged


INCLUDE = re.compile(r'^\s*--8<--\s+"[^"]+"\s*$')


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        if all(INCLUDE.match(line) for line in match.group(2).strip().splitlines()):
            continue
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        reason = SKIP.search(before)
        found.append(Block(str(path.relative_to(ROOT)), text.count("\n", 0, match.start()) + 1, match.group(1).lower(),
                           match.group(2), reason.group(1) if reason else None))
    return found


def python_pages() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages() if any(b.language == "python" and not b.skip for b in blocks(p))]


@pytest.fixture(scope="module")
def workspace_template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("docs") / "template")


@pytest.fixture
def workspace(workspace_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template, as the working directory (a snippet may write files into it)."""
    folder = tmp_path / "work"
    shutil.copytree(workspace_template, folder)
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("page", python_pages())
def test_python_blocks_run(page, workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "cache"))  # nothing a snippet builds lands in the user's cache
    namespace = {"__name__": "__docs__"}
    for block in blocks(ROOT / page):
        if block.language != "python" or block.skip:
            continue
        try:
            exec(compile(block.code, f"{block.page}:{block.line}", "exec", dont_inherit=True), namespace)
        except Exception as error:
            pytest.fail(f"{block.page} line {block.line}: {type(error).__name__}: {error}\n\n{block.code}")


def test_at_most_a_quarter_of_python_blocks_are_skipped():
    python = [b for p in pages() for b in blocks(p) if b.language == "python"]
    skipped = [f"{b.page}:{b.line} ({b.skip})" for b in python if b.skip]
    assert python, "no Python blocks found"
    assert len(skipped) <= len(python) / 4, f"{len(skipped)} of {len(python)} Python blocks are skipped: {skipped}"


def read_toml_block(path: Path):
    """The reader for the kind of file the block is, chosen by its tables."""
    import tomllib

    from graphprune.app.compress.spec import read_compress_job
    from graphprune.app.run_file import read_job
    from graphprune.app.search.job import read_search_job
    from graphprune.infra.pipeline import load_steps, resolve_steps

    tables = set(tomllib.loads(path.read_text()))
    if "compress" in tables:
        return read_compress_job(path)
    if "search" in tables or "enqueue" in tables:
        return read_search_job(path)
    if tables <= {"passes"}:
        return resolve_steps(load_steps(path))
    return read_job(path)


def toml_blocks() -> list[Block]:
    return [b for p in pages() for b in blocks(p) if b.language == "toml" and not b.skip]


@pytest.mark.parametrize("block", toml_blocks(), ids=lambda b: f"{b.page}:{b.line}")
def test_toml_blocks_pass_their_reader(block, workspace):
    path = workspace / "job.toml"
    path.write_text(block.code)
    try:
        read_toml_block(path)
    except Exception as error:
        pytest.fail(f"{block.page} line {block.line}: {type(error).__name__}: {error}\n\n{block.code}")


# Work-item words: the code and the docs speak of the product, not of the work that made it.
# "issue N" stays when it names an upstream project's tracker (onnxruntime issue 25890).
WORK_ITEM = re.compile(r"\bissues?\s+#?\d+|\bthe issue\b|\bblocked\b|\bwork items?\b", re.I)
UPSTREAM = re.compile(r"(onnxruntime|pytorch|torch|transformers|optuna|torchao|onnx|accelerate|huggingface|mkdocs|datasets|github\.com\S*)\S*\s*(issue|#)", re.I)
SCANNED = ["graphprune", "passes", "bench", "tutorials", "tests", "docs", "README.md", "Makefile", ".ci/run", "mkdocs.yml", "pyproject.toml"]
SUFFIXES = {".py", ".md", ".toml", ".yml", ".txt", ""}


def scanned_files() -> list[Path]:
    files = []
    for entry in SCANNED:
        path = ROOT / entry
        found = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES]
        files += [p for p in found if "__pycache__" not in p.parts and p != Path(__file__)]
    return files


def work_item_words(text: str) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in WORK_ITEM.finditer(line):
            if UPSTREAM.search(line[max(0, match.start() - 40): match.end()]):
                continue
            hits.append(f"{number}: {line.strip()[:120]}")
    return hits


def test_the_work_item_check_tells_upstream_references_apart():
    assert work_item_words("see onnxruntime issue 25890 for the fix") == []
    assert work_item_words("a known torch issue #12345") == []
    assert len(work_item_words("Learned compression (issue 19 is blocked on one target)")) == 2
    assert len(work_item_words("the issue's targets")) == 1


def test_no_work_item_words():
    found = {str(p.relative_to(ROOT)): hits for p in scanned_files() if (hits := work_item_words(p.read_text(errors="replace")))}
    assert found == {}


def test_passes_reference_matches_the_registry():
    """Every registered pass has its section with every field, and the page is as the registry writes it now."""
    import dataclasses

    import graphprune
    from graphprune.app.reference import passes_markdown

    page = (ROOT / "docs" / "reference" / "passes.md").read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", page, re.S | re.M))
    assert sorted(sections) == sorted(graphprune.list_passes())
    for name, section in sections.items():
        config = graphprune.get_pass(name).config_cls
        fields = [f.name for f in dataclasses.fields(config) if not f.name.startswith("_")] if config else []
        assert re.findall(r"^\| `(\w+)` \|", section, re.M) == fields, name
    assert page == passes_markdown(), "docs/reference/passes.md is stale: run make docs (graphprune passes --markdown ...)"


def test_passes_reference_names_a_users_own_pass(tmp_path):
    """The page is written from whatever is registered: a pass registered now appears with its fields."""
    from dataclasses import dataclass

    import graphprune
    from graphprune.app.cli import main

    @dataclass(frozen=True)
    class ShrinkConfig:
        factor: float = 0.5
        label: str = "x"

    @graphprune.register_pass("docs_check_shrink", config=ShrinkConfig)
    def shrink(graph, config):
        """Shrink nothing: a pass for the reference page's test."""
        return graph, {}

    try:
        assert main(["passes", "--markdown", str(tmp_path / "passes.md")]) == 0
    finally:
        graphprune.unregister_pass("docs_check_shrink")
    page = (tmp_path / "passes.md").read_text()
    section = page.split("## docs_check_shrink\n", 1)[1].split("\n## ", 1)[0]
    assert "Shrink nothing: a pass for the reference page's test." in section
    assert "| `factor` | `float` | `0.5` |" in section and "| `label` | `str` | `'x'` |" in section
    assert 'name = "docs_check_shrink"\nfactor = 0.5\nlabel = "x"' in section


@pytest.mark.skipif(shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None,
                    reason="the docs extra is not installed (pip install -e .[docs])")
def test_site_builds_strict(tmp_path):
    """A broken link, a page missing from disk or a docstring that does not render fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "passes" / "index.html").is_file()


def test_every_fence_starts_a_line():
    """A fence indented (inside a list item) would escape the checks above: the pages keep their blocks at the margin."""
    indented = [f"{p.relative_to(ROOT)}:{n}" for p in pages() for n, line in enumerate(p.read_text().splitlines(), 1)
                if re.match(r"^\s+```", line)]
    assert indented == []


def test_api_reference_documents_every_public_name():
    """docs/reference/api.md renders (mkdocstrings) exactly what ``import graphprune`` exports."""
    import graphprune

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    documented = re.findall(r"^::: graphprune\.(\w+)$", page, re.M)
    assert sorted(documented) == sorted(graphprune.__all__)
