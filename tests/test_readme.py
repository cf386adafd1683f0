"""README.md against the repository: its first section is the two commands, its Layout section names what git
tracks (every top-level entry, every file of the package) and nothing that is not there, and every repository path
it links or quotes exists. Fails when the README and the tree drift apart."""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMMANDS = ["python benchmarks/sample_speed.py", "bash tests/run.sh"]


def _git_files(*args: str) -> set[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # an unpacked sdist: nothing to compare with
        pytest.skip(f"not a git checkout: {e}")
    return {p for p in out.decode().split("\0") if p and (ROOT / p).exists()}


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    """The files git tracks."""
    return _git_files("--cached")


@pytest.fixture(scope="module")
def present(tracked) -> set[str]:
    """Tracked files and the new ones git would track (not ignored): what a named path may be."""
    return tracked | _git_files("--others", "--exclude-standard")


def _sections() -> list[tuple[str, str]]:
    """(title, body) of each level-2 section, in order; headings inside fenced code do not count."""
    sections, title, body, fenced = [], None, [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            if title is not None:
                sections.append((title, "\n".join(body)))
            title, body = line[3:].strip(), []
        elif title is not None:
            body.append(line)
    if title is not None:
        sections.append((title, "\n".join(body)))
    return sections


def _section(name: str) -> str:
    found = [body for title, body in _sections() if title == name]
    assert len(found) == 1, f"README.md: expected one '## {name}' section, found {len(found)}"
    return found[0]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def _layout_paths() -> list[str]:
    """The first word of each line of the Layout section's code block (indented lines continue a description)."""
    blocks = _code_blocks(_section("Layout"))
    assert blocks, "README.md: the Layout section has no code block"
    return [line.split()[0] for line in blocks[0].splitlines() if line.strip() and not line[0].isspace()]


def _exists(path: str, files: set[str]) -> bool:
    if path.endswith("/"):
        return any(f.startswith(path) for f in files)
    return path in files


def test_first_section_is_the_two_commands():
    sections = _sections()
    assert sections and sections[0][0] == "Two commands on a fresh machine", [t for t, _ in sections[:2]]
    commands = []
    for block in _code_blocks(sections[0][1]):
        for line in block.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                commands.append(command)
    print("first section's commands:", commands)
    assert commands == COMMANDS


def test_layout_names_only_what_exists(present):
    paths = _layout_paths()
    print(f"{len(paths)} paths in the Layout section")
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"named twice in the Layout section: {duplicates}"
    missing = [p for p in paths if not _exists(p, present)]
    assert not missing, f"the Layout section names paths git does not have: {missing}"


def test_layout_names_every_top_level_entry(tracked):
    named = set(_layout_paths())
    top = {f.split("/", 1)[0] + ("/" if "/" in f else "") for f in tracked}
    # a folder counts as named when the folder itself or a path inside it is
    unnamed = sorted(t for t in top if t not in named and not (t.endswith("/") and any(p.startswith(t) for p in named)))
    assert not unnamed, f"top-level entries the Layout section does not name: {unnamed}"


def test_layout_names_every_package_file(tracked):
    named = set(_layout_paths())
    unnamed = sorted(f for f in tracked if f.startswith("ddpm_fast/") and f not in named)
    assert not unnamed, f"files of ddpm_fast/ the Layout section does not name: {unnamed}"


def test_every_linked_or_quoted_repository_path_exists(present):
    text = README.read_text()
    tops = {f.split("/", 1)[0] for f in present if "/" in f}
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    quoted = [
        token.rstrip(".,;:)")
        for span in re.findall(r"`([^`\n]+)`", text)
        for token in span.split()
        if "/" in token and "<" not in token and "*" not in token
    ]
    candidates = [p for p in links if not re.match(r"[a-z]+:", p)]
    candidates += [p for p in quoted if re.fullmatch(r"[\w.\-/]+", p) and p.split("/", 1)[0] in tops]
    print(f"{len(set(candidates))} repository paths linked or quoted")
    missing = sorted({p for p in candidates if not (_exists(p, present) or _exists(p.rstrip("/") + "/", present))})
    assert not missing, f"README.md links or quotes paths that do not exist: {missing}"
