"""The documentation stays true to the repository: README.md is a short guide, every figure in
docs/results.md names a stored JSON file and keys that exist in it, every stored result is quoted,
and every relative link leads somewhere. Reads files only (no TensorFlow, no benchmark runs)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS_MD = DOCS / "results.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
README_MAX_LINES = 250

JSON_REF = re.compile(r"benchmarks/results/([A-Za-z0-9_.-]+\.json)")
KEY_REF = re.compile(r"`key: ([^`]+)`")
MARKDOWN_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SESSION = re.compile(r"\bsessions?\b", re.IGNORECASE)


def guides() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def results_lines() -> list[tuple[int, str]]:
    """(line number, line) for every line of docs/results.md that mentions benchmarks/results/."""
    return [(number, line) for number, line in enumerate(RESULTS_MD.read_text().splitlines(), 1)
            if "benchmarks/results/" in line]


def lookup(data, dotted: str):
    """The value at ``a.b.0.c`` (numbers index lists); KeyError naming the missing step."""
    node = data
    for step in dotted.split("."):
        if isinstance(node, list):
            if not step.isdigit() or int(step) >= len(node):
                raise KeyError(f"{dotted}: no list index {step!r}")
            node = node[int(step)]
        elif isinstance(node, dict):
            if step not in node:
                raise KeyError(f"{dotted}: no key {step!r}")
            node = node[step]
        else:
            raise KeyError(f"{dotted}: {step!r} below a {type(node).__name__}")
    return node


def stored_results() -> list[Path]:
    """Every JSON file in benchmarks/results/ that git would keep (ignored intermediates, such as
    throughput.py's per-configuration files or run_all.py --quick's folder, are not results)."""
    files = sorted(RESULTS_DIR.glob("*.json"))
    try:
        ignored = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, capture_output=True, text=True,
                                 input="\n".join(str(f.relative_to(ROOT)) for f in files), timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        ignored = ""
    skip = {line.strip() for line in ignored.splitlines()}
    return [f for f in files if str(f.relative_to(ROOT)) not in skip]


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES} (move detail to docs/)"


def test_readme_keeps_the_two_commands_first():
    head = README.read_text().splitlines()[:6]
    assert "bash scripts/demo.sh" in "\n".join(head) and "bash scripts/test.sh" in "\n".join(head)


def test_every_quoted_result_and_key_exists():
    lines = results_lines()
    assert lines, "docs/results.md quotes no benchmarks/results/*.json"
    problems = []
    cited_keys = 0
    for number, line in lines:
        names = JSON_REF.findall(line)
        if not names:
            problems.append(f"results.md:{number}: mentions benchmarks/results/ but names no .json file")
            continue
        for name in set(names):
            path = RESULTS_DIR / name
            if not path.is_file():
                problems.append(f"results.md:{number}: {path.relative_to(ROOT)} does not exist")
                continue
            data = json.loads(path.read_text())
            for dotted in KEY_REF.findall(line):
                cited_keys += 1
                try:
                    lookup(data, dotted.strip())
                except KeyError as exc:
                    problems.append(f"results.md:{number}: {name}: {exc.args[0]}")
    assert not problems, "\n".join(problems)
    assert cited_keys, "docs/results.md cites no `key: ...` at all"


def test_every_line_with_keys_names_one_file():
    """A key belongs to the file on its line: a line that cites keys names exactly one file."""
    for number, line in enumerate(RESULTS_MD.read_text().splitlines(), 1):
        if KEY_REF.search(line):
            assert len(set(JSON_REF.findall(line))) == 1, f"results.md:{number}: keys need exactly one JSON file"


def test_every_stored_result_is_quoted():
    quoted = {name for _, line in results_lines() for name in JSON_REF.findall(line)}
    unquoted = [f.name for f in stored_results() if f.name not in quoted]
    assert not unquoted, (f"benchmarks/results/ holds JSON that docs/results.md does not quote: {unquoted}; "
                          f"quote each figure (with its command and keys) or delete the file")


def test_every_stored_result_has_a_run_all_job():
    """`python benchmarks/run_all.py` regenerates every stored result (importing it runs nothing)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    jobs = {job.name for job in run_all.JOBS if job.stored}
    stored = {f.stem for f in stored_results()}
    assert stored <= jobs, f"no run_all.py job writes {sorted(stored - jobs)}"
    assert jobs <= stored, f"run_all.py jobs marked stored without a stored result: {sorted(jobs - stored)}"


@pytest.mark.parametrize("path", guides(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_session_talk_and_no_link_outside_the_repository(path):
    text = path.read_text()
    found = SESSION.search(text)
    assert not found, f"{path.name}: says {found.group(0)!r} (describe the project, not how it was made)"
    assert "../shared" not in text, f"{path.name}: points at ../shared, outside the repository"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces
    to hyphens); headings inside code blocks do not count."""
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (heading := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", guides(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    broken = []
    for target in MARKDOWN_LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL or mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(target)
        elif ROOT not in (resolved, *resolved.parents):
            broken.append(f"{target} (outside the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.name}: broken relative links: {broken}"
