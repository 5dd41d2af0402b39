"""``bench/results_pages.py``: the results pages are generated from the benchmarks' JSON and kept current.

The fixture under tests/fixtures/results holds a small result in every shape a benchmark
writes (machine, a job file, rows with nested fields, a dict of rows keyed by name,
targets with and without verdicts, a nested target) and an older run of it; its page is
compared with a golden file read and checked by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "results"
sys.path.append(str(ROOT / "bench"))  # appended: the bench scripts' names never shadow an installed module

import results_pages  # noqa: E402  (bench/results_pages.py)
import results_render  # noqa: E402

PAGES = {"demo": results_pages.Page("demo.json", "Demo benchmark", "A fixture with every shape a result takes.",
                                     "python bench/demo.py --flag", ("demo.png",))}


def run(*args: str, out: Path, readme: Path) -> int:
    return results_pages.main([*args, "--results", str(FIXTURE), "--out", str(out), "--readme-file", str(readme)], pages=PAGES)


def test_page_from_the_fixture_matches_the_golden_file(tmp_path):
    assert run(out=tmp_path, readme=tmp_path / "README.md") == 0
    assert (tmp_path / "demo.md").read_bytes() == (FIXTURE / "demo.expected.md").read_bytes()
    assert (tmp_path / "plots" / "demo.png").read_bytes() == (FIXTURE / "demo.png").read_bytes()
    index = (tmp_path / "index.md").read_text()
    assert "| [Demo benchmark](demo.md) | A fixture with every shape a result takes. | Test CPU | not recorded | 2 met, 1 not met, 1 without a recorded verdict |" in index


def test_claims_tally_counts_the_verdicts_the_json_records():
    import json

    data = json.loads((FIXTURE / "demo.json").read_text())
    claims, skip = results_render.find_claims(data)
    # targets: one met, one not met, one with no "met" key; mixed.target: met
    assert {c.name: c.verdict for c in claims} == {"speedup_vs_eager": True, "drop_points": False, "checkpoint_ratio": None, "mixed.target": True}
    assert results_render.tally(claims) == (2, 1, 1)
    assert skip == {("targets",), ("mixed", "target")}  # drawn once, in the claims table
    older = json.loads((FIXTURE / "demo_older.json").read_text())
    assert results_render.tally(results_render.find_claims(older)[0]) == (0, 1, 0)
    # a summary under "targets" with no verdict, value or target (one per ISA cap, say) is a table, not a claim
    assert results_render.find_claims({"targets": {"AVX2": {"rms": 1.17, "within_half_point": True}}}) == ([], set())


def test_check_names_a_stale_page_and_a_missing_plot(tmp_path, capsys):
    readme = tmp_path / "README.md"
    assert run(out=tmp_path, readme=readme) == 0
    assert run("--check", out=tmp_path, readme=readme) == 0
    page = tmp_path / "demo.md"
    page.write_text(page.read_text().replace("| 7.1 | 4 | met |", "| 9.9 | 4 | met |"))
    (tmp_path / "plots" / "demo.png").unlink()
    capsys.readouterr()
    assert run("--check", out=tmp_path, readme=readme) == 1
    err = capsys.readouterr().err
    assert "stale results pages" in err and "demo.md" in err and "plots/demo.png" in err and "index.md" not in err
    assert "9.9" in page.read_text()  # --check writes nothing
    assert run(out=tmp_path, readme=readme) == 0 and run("--check", out=tmp_path, readme=readme) == 0


def test_a_page_no_longer_generated_is_stale_and_removed(tmp_path, capsys):
    readme = tmp_path / "README.md"
    assert run(out=tmp_path, readme=readme) == 0
    (tmp_path / "gone.md").write_text(results_pages.GENERATED.format("gone.json") + "\n")
    (tmp_path / "notes.md").write_text("written by hand\n")  # not generated: never touched
    assert run("--check", out=tmp_path, readme=readme) == 1 and "gone.md" in capsys.readouterr().err
    assert run(out=tmp_path, readme=readme) == 0
    assert not (tmp_path / "gone.md").exists() and (tmp_path / "notes.md").exists()


def test_a_json_of_no_page_is_refused_by_name(tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(FIXTURE, results)
    (results / "orphan.json").write_text("{}")
    assert results_pages.main(["--results", str(results), "--out", str(tmp_path / "out"), "--readme-file", str(tmp_path / "R.md")], pages=PAGES) == 2
    assert "orphan.json: belongs to no results page" in capsys.readouterr().err


def test_committed_pages_are_current(tmp_path):
    """Regenerating docs/results from bench/results into a copy changes no byte and adds or removes no file."""
    copy = tmp_path / "results"
    shutil.copytree(results_pages.DOCS, copy)
    assert results_pages.write(results_pages.build(), copy) == [], "docs/results is stale: run python bench/results_pages.py"
    def tree(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    assert tree(copy) == tree(results_pages.DOCS)


def test_every_result_json_is_a_page_or_its_history():
    older = results_pages.history(results_pages.RESULTS, results_pages.PAGES)
    listed = {p.result for p in results_pages.PAGES.values()} | {o for names in older.values() for o in names}
    assert listed == {p.name for p in results_pages.RESULTS.glob("*.json")}
    assert "learned_l0_kprune_2ep.json" in older["learned"] and "search_trials18.json" in older["search"]


def test_readme_block_is_rewritten_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# title\n\nintro\n\n", "\n\n## next\n"
    readme.write_text(before + results_pages.START + "\nold table\n" + results_pages.END + after)
    assert results_pages.update_readme(readme) is True
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after) and "old table" not in text
    assert "| 0.54 / 0.32 (accuracy) | 7.10x / 6.15x | 3.11x / 2.72x |" in text  # compress.json: rt run, served speed-ups
    assert "bench/results/compress.png" in text and "AMD EPYC" in text
    assert results_pages.update_readme(readme) is False and readme.read_text() == text  # deterministic: nothing to do
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    assert results_pages.update_readme(plain) is False and plain.read_text() == "no markers here\n"


@pytest.mark.parametrize("value, text", [(0.8330670926517572, "0.8331"), (123.456, "123.5"), (2.0, "2"), (12345.6, "12346"),
                                         (1.5e-05, "1.5e-05"), (22713986, "22,713,986"), (1252, "1252"), (None, "—"), (True, "yes"), ([], "none")])
def test_numbers_are_rounded_for_reading(value, text):
    assert results_render.fmt(value) == text
