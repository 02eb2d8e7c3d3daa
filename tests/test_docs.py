"""The documents the code cites are in the repository: every docs/<file>.md#<anchor> named in a source file,
a test or the README exists and has a heading with that anchor (GitHub's slug of the heading)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([A-Za-z_]+\.md)(?:#([a-z0-9-]+))?")


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set:
    return {slug(line.lstrip("#")) for line in document.read_text().splitlines() if line.startswith("#")}


def citations():
    folders = ("pipeline", "data", "discovery", "train", "eval", "benchmarks", "tests")
    sources = [REPO / "README.md", *(p for folder in folders for p in (REPO / folder).rglob("*.py"))]
    for source in sources:
        for match in CITATION.finditer(source.read_text()):
            yield source.relative_to(REPO), match.group(1), match.group(2)


def test_slug_follows_github():
    assert slug("Choices where the paper is silent") == "choices-where-the-paper-is-silent"
    assert slug("The attention store (format 1, HDF5)") == "the-attention-store-format-1-hdf5"


def test_every_cited_document_and_anchor_exists():
    found = list(citations())
    assert len(found) >= 10
    missing = [f"{source}: docs/{name}" + (f"#{anchor}" if anchor else "") for source, name, anchor in found
               if not (REPO / "docs" / name).is_file()
               or (anchor and anchor not in anchors(REPO / "docs" / name))]
    assert missing == []
