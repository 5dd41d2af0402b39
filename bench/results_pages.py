"""The documentation's results pages, generated from ``bench/results/*.json``: never copied by hand.

Writes ``docs/results/<name>.md`` for every benchmark in ``PAGES`` (its command, machine,
settings, claims with their verdicts as recorded, tables, plots and older runs),
``docs/results/index.md``, the plots under ``docs/results/plots/`` (byte-identical copies),
and the headline block of ``README.md`` between ``<!-- results:start -->`` and
``<!-- results:end -->`` (left alone where those markers are absent).

Run: ``python bench/results_pages.py [--check] [--readme]``. ``--check`` writes nothing and
exits 1 naming every page that regeneration would change; ``--readme`` rewrites only the
README block (a plain run does both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from results_render import claims_table, date_of, differences, escape, find_claims, fmt, inline, key_values, machine_line, machine_of, section, tally_text  # bench/results_render.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "results"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Page:
    result: str  # the canonical JSON, in the results folder
    title: str
    description: str
    command: str
    plots: tuple[str, ...] = ()
    attachments: tuple[str, ...] = ()  # other files the page links (served as they are)


# One canonical JSON per benchmark. Every other ``<name>_*.json`` belongs to the page whose
# name is its longest prefix and is listed there under History, never as the result.
PAGES: dict[str, Page] = {
    "trace": Page("trace.json", "Tracing and checkpoint costs", "Tracing, forward and checkpoint costs on a bert-base sized classifier.",
                  "python bench/trace_bench.py"),
    "unstructured": Page("unstructured.json", "Unstructured pruning", "Accuracy per method and sparsity, recovery, and the costs of masks.",
                         "python bench/unstructured.py", ("unstructured.png",)),
    "structured": Page("structured.json", "Structured pruning", "Heads and neurons removed: accuracy, measured speed-up, the cost of pruning.",
                       "python bench/structured.py", ("structured.png",)),
    "quantize": Page("quantize.json", "Quantization", "Simulated formats for accuracy, lowered int8 and bf16 for speed.",
                     "python bench/quantize.py", ("quantize.png",)),
    "int8_isa": Page("int8_isa.json", "int8 on every CPU", "The lower pass's int8 scheme per oneDNN ISA, and what each keeps.",
                     "python bench/int8_isa.py", ("int8_isa.png",)),
    # mixed_precision.json is the default command's run (per layer, with QAT); the newer
    # mixed_precision_linear.json ran with --granularity linear and no QAT, so it is history
    "mixed_precision": Page("mixed_precision.json", "Mixed precision", "Hessian mixed precision against uniform widths at the same average bits.",
                            "python bench/mixed_precision.py"),
    # No run of every method exists: the bench ran in three parts. learned_l0_kprune.json is
    # the newest full run at the bench's defaults (targets 0.6, 0.75, 0.88, one epoch,
    # current recipe) of the part that answers its main targets; the two-epoch runs are
    # newer but chose other targets, and the rpp and factorize parts answer other targets
    "learned": Page("learned_l0_kprune.json", "Learned compression", "Compression learned while fine-tuning: accuracy against measured speed-up.",
                    "python bench/learned.py --methods l0,kprune", ("learned_l0_kprune.png",)),
    "l0_recipe": Page("l0_recipe.json", "l0 recipe", "Which l0_structured recipe works with a short budget.", "python bench/l0_recipe.py"),
    # deploy_static_calibrated.json is a later rerun (static int8 calibrated on every Linear) on a
    # VM that timed everything slower and noisier; the README keeps it apart too: history
    "deploy": Page("deploy.json", "Deployment", "Every runtime a compressed MiniLM can ship in, side by side.",
                   "python bench/deploy.py", ("deploy.png",)),
    "onnx_static": Page("onnx_static.json", "Static int8 ONNX", "Static int8 ONNX with every Linear calibrated, against the fused ones left weight-only.",
                        "python bench/onnx_static.py"),
    # search.json is the newest run, of the current space; the other three searched older spaces
    "search": Page("search.json", "Search", "graphprune search against the hand-picked pipelines of the other benchmarks.",
                   "python bench/search.py", ("search.png", "search_pareto.png")),
    "split_gap": Page("split_gap.json", "Validation and test gap", "Why structured pruning loses more on validation than on test.",
                      "python bench/split_gap.py"),
    "tasks": Page("tasks.json", "User tasks", "Compression of the tasks users bring, through the user path.", "python bench/tasks.py",
                  ("tasks_rotten_tomatoes.png", "tasks_bbc_pairs.png", "tasks_bbc_retrieval.png")),
    "compress": Page("compress.json", "graphprune compress", "graphprune compress as a user runs it, its artefact timed as served.",
                     "python bench/compress.py", ("compress.png",), ("compress_rt_report.html", "compress_bbc_report.html")),
}
GENERATED = "<!-- generated by bench/results_pages.py from bench/results/{}: do not edit -->"


def history(results: Path, pages: dict[str, Page]) -> dict[str, list[str]]:
    """Every JSON in the results folder that is not a page's result, under the page it belongs to."""
    out: dict[str, list[str]] = {name: [] for name in pages}
    canonical = {page.result for page in pages.values()}
    for path in sorted(results.glob("*.json")):
        if path.name in canonical:
            continue
        owners = [n for n in pages if path.stem.startswith(n + "_")]
        if not owners:
            raise ValueError(f"{path}: belongs to no results page (pages: {', '.join(pages)}); add it to PAGES in bench/results_pages.py")
        out[max(owners, key=len)].append(path.name)
    return out


def load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise ValueError(f"results page: {path} does not exist (PAGES names it; run its benchmark or fix the mapping)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def render_page(name: str, page: Page, results: Path, older: list[str]) -> str:
    data = load(results, page.result)
    claims, skip = find_claims(data)
    lines = [GENERATED.format(page.result), "", f"# {escape(page.title)}", "", escape(page.description), "",
             f"- Command: `{page.command}`", f"- Result: `bench/results/{page.result}`",
             f"- Machine: {escape(machine_line(machine_of(data), data.get('torch')))}",
             f"- Date: {escape(date_of(data) or 'not recorded')}",
             f"- What was tried and why: [experiments]({'../experiments/' + name + '.md'})", ""]
    unjudged = [k for k in ("targets", "target", "claims") if isinstance(data.get(k), dict) and (k,) not in skip]
    none = "No claims with a verdict or a target recorded" + (f"; the JSON's {unjudged[0]} are drawn below." if unjudged else ".")
    lines += ["## Claims", ""] + ((claims_table(claims) + ["", f"Tally: {tally_text(claims)}."]) if claims else [none])
    top = {k: v for k, v in data.items() if (k,) not in skip and k != "machine"}
    settings = {k: v for k, v in top.items() if not isinstance(v, (dict, list)) or (inline(v) and not isinstance(v, dict))}
    lines += ["", "## Run", "", "Settings and single values, as the JSON records them:", ""] + (key_values(settings) or ["None recorded."])
    if isinstance(top.get("settings"), dict):
        lines += section("Run settings", top.pop("settings"), 3, ("settings",), skip)
    if page.plots:
        lines += ["", "## Plots"] + [x for p in page.plots for x in ("", f"![{p}](plots/{p})")]
    if page.attachments:
        lines += ["", "## Reports", ""] + [f"- [{a}](reports/{a})" for a in page.attachments]
    for key, value in top.items():
        if key not in settings:
            lines += section(key, value, 2, (key,), skip)
    lines += ["", "## History", ""]
    if older:
        lines += ["Other runs of this benchmark, kept beside the result; what differs is what their JSON records.", "",
                  "| File | What differs | Date | Claims |", "|---|---|---|---|"]
        for other in older:
            odata = load(results, other)
            plot = Path(other).with_suffix(".png").name
            shown = f"`{other}`" + (f" ([plot](plots/{plot}))" if (results / plot).is_file() else "")
            lines.append(f"| {shown} | {'; '.join(differences(data, odata)) or 'no recorded setting differs'} | "
                         f"{escape(date_of(odata) or 'not recorded')} | {tally_text(find_claims(odata)[0])} |")
    else:
        lines.append("No other runs kept.")
    # sections open and close with a blank line: one between them is enough (a job file's own lines are one item)
    lines = [line for i, line in enumerate(lines) if line or i == 0 or lines[i - 1]]
    return "\n".join(lines).rstrip("\n") + "\n"


def render_index(pages: dict[str, Page], results: Path) -> str:
    lines = [GENERATED.format("*.json"), "", "# Results", "",
             "Every benchmark's latest result, generated from its JSON. Each page names the command that produced it.", "",
             "| Benchmark | What | CPU | Date | Claims |", "|---|---|---|---|---|"]
    for name, page in pages.items():
        data = load(results, page.result)
        machine = machine_of(data) or {}
        cpu = machine.get("cpu") or "not recorded" + (f" ({machine['processor']})" if machine.get("processor") else "")
        lines.append(f"| [{escape(page.title)}]({name}.md) | {escape(page.description)} | {escape(cpu)} | "
                     f"{escape(date_of(data) or 'not recorded')} | {tally_text(find_claims(data)[0])} |")
    return "\n".join(lines) + "\n"


def build(results: Path = RESULTS, pages: dict[str, Page] = PAGES) -> dict[str, bytes]:
    """Every generated file, by its path under the results docs folder."""
    older = history(results, pages)
    files = {f"{name}.md": render_page(name, page, results, older[name]).encode() for name, page in pages.items()}
    files["index.md"] = render_index(pages, results).encode()
    for name, page in pages.items():
        plots = list(page.plots) + [Path(o).with_suffix(".png").name for o in older[name] if (results / o).with_suffix(".png").is_file()]
        for folder, names in (("plots", plots), ("reports", page.attachments)):
            for file in names:
                if not (results / file).is_file():
                    raise ValueError(f"results page {name!r}: {results / file} does not exist (PAGES lists it among the page's {folder})")
                files[f"{folder}/{file}"] = (results / file).read_bytes()
    return files


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ours(out: Path) -> list[str]:
    """Files already in the folder that a run made: generated pages, plots and reports."""
    found = [p for p in out.glob("*.md") if p.read_text().startswith(GENERATED.split("{}")[0])]
    found += [p for sub in ("plots", "reports") for p in (out / sub).glob("*") if p.is_file()]
    return sorted(str(p.relative_to(out)) for p in found)


def stale(files: dict[str, bytes], out: Path) -> list[str]:
    """Pages regeneration would write, change or remove."""
    changed = [rel for rel, data in files.items() if not (out / rel).is_file() or (out / rel).read_bytes() != data]
    return sorted(changed + [rel for rel in ours(out) if rel not in files])


def write(files: dict[str, bytes], out: Path) -> list[str]:
    changed = stale(files, out)
    for rel in changed:
        if rel in files:
            write_atomic(out / rel, files[rel])
        else:
            (out / rel).unlink()
    return changed


def readme_block(results: Path = RESULTS) -> str:
    """The README's headline: the main job's result, from compress.json."""
    data = load(results, "compress.json")
    m = machine_of(data) or {}
    lines = [START, "",
             f"`{PAGES['compress'].command}` runs `graphprune compress` with a {data.get('budget', '?')} budget per model "
             f"({fmt(data.get('seconds'))} s in all) on {m.get('cpu', 'a CPU it did not record')} ({m.get('cores', '?')} cores, "
             f"torch {m.get('torch', '?')}, {m.get('threads', '?')} threads). Speed-ups are the chosen artefact served, against "
             "the dense model in torch eager fp32 and in ONNX Runtime int8 (the peer a user would otherwise pick):", "",
             "| Model | Data | Chosen pipeline | Runtime | Drop in points, validation / test "
             "| vs dense fp32, 8x128 / 1x64 | vs ONNX Runtime int8, 8x128 / 1x64 |", "|---|---|---|---|---|---|---|"]
    for run in data["runs"].values():
        job, speed = run["compress"], run["speedups"]
        chosen = job["chosen"]
        ratio = [" / ".join(f"{speed[shape][key]:.2f}x" for shape in job["shapes"]) for key in ("vs_eager_fp32", "vs_ort_int8")]
        model = Path(job["model"].get("checkpoint") or job["model"].get("name", "?")).name
        lines.append(f"| {escape(model)} | {escape(job['data'].get('name', '?'))} | {escape(chosen['pipeline'])} | {escape(chosen.get('runtime', '?'))} "
                     f"| {chosen['drop_points']:.2f} / {chosen['drop_test_points']:.2f} ({escape(job.get('metric', '?'))}) | {ratio[0]} | {ratio[1]} |")
    lines += ["", "![compress: every trial's accuracy against its speed-up, and the served latencies](bench/results/compress.png)",
              "", "Every number of the run: [docs/results/compress.md](docs/results/compress.md).", "", END]
    return "\n".join(lines)


def update_readme(readme: Path, results: Path = RESULTS, write_file: bool = True) -> bool:
    """Rewrite the README's results block; False (and nothing written) where it is current or has no markers."""
    if not readme.is_file():
        return False
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return False
    new = text[:start] + readme_block(results) + text[end + len(END):]
    if new == text:
        return False
    if write_file:
        write_atomic(readme, new.encode())
    return True


def main(argv: list[str] | None = None, pages: dict[str, Page] = PAGES) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the pages regeneration would change")
    parser.add_argument("--readme", action="store_true", help="rewrite only the README's results block")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the benchmarks' JSON folder (default bench/results)")
    parser.add_argument("--out", type=Path, default=DOCS, help="where the pages go (default docs/results)")
    parser.add_argument("--readme-file", type=Path, default=README, help="the README holding the results markers")
    args = parser.parse_args(argv)
    try:
        files = {} if args.readme else build(args.results, pages)
        readme_changes = update_readme(args.readme_file, args.results, write_file=not args.check)
    except (ValueError, OSError, KeyError) as error:
        print(f"results_pages: {error}", file=sys.stderr)
        return 2
    if args.check:
        changed = ([] if args.readme else stale(files, args.out)) + ([str(args.readme_file)] if readme_changes else [])
        if changed:
            print(f"stale results pages (run python bench/results_pages.py): {', '.join(changed)}", file=sys.stderr)
            return 1
        print(f"results pages current: {len(files)} files in {args.out}")
        return 0
    if not args.readme:
        print(f"wrote {len(write(files, args.out))} of {len(files)} files in {args.out}")
    print(f"{args.readme_file}: results block " + ("rewritten" if readme_changes else "current, or no markers (left alone)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
