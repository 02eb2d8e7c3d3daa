"""The documents are whole: every link of the README and of docs/ leads to a file that exists (and, with an
anchor, to a heading with that anchor: GitHub's slug of the heading), and every docs/<path> that a source file,
a test or a document names exists too."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("pipeline", "data", "discovery", "train", "eval", "experiments", "benchmarks", "tests")
# docs/<folders>/<file>.<ext>[#anchor], as code and prose name a document
CITATION = re.compile(r"docs/((?:[\w.-]+/)*[\w.-]+\.(?:md|json|png))(?:#([a-z0-9-]+))?")
# [text](target) and ![alt](target) in markdown, target without spaces or parentheses
LINK = re.compile(r"\]\(([^()\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(document: Path) -> set:
    text = FENCE.sub("", document.read_text())
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def documents():
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def broken(target: Path, anchor: str | None) -> bool:
    return not target.is_file() or bool(anchor and target.suffix == ".md" and anchor not in anchors(target))


def links():
    """(document, target as written, resolved path, anchor) for every relative link of every document."""
    for document in documents():
        for match in LINK.finditer(FENCE.sub("", document.read_text())):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            yield document.relative_to(REPO), target, (document.parent / path) if path else document, anchor or None


def citations():
    sources = [*documents(), *(p for folder in SOURCE_FOLDERS if (REPO / folder).is_dir()
                               for p in (REPO / folder).rglob("*.py"))]
    for source in sources:
        for match in CITATION.finditer(source.read_text()):
            yield source.relative_to(REPO), match.group(1), match.group(2)


def test_slug_follows_github():
    assert slug("Choices where the paper is silent") == "choices-where-the-paper-is-silent"
    assert slug("The attention store (format 1, HDF5)") == "the-attention-store-format-1-hdf5"
    assert slug("Memory per GPU (estimated)") == "memory-per-gpu-estimated"


def test_every_link_in_the_readme_and_docs_resolves():
    found = list(links())
    assert len(found) >= 30
    assert [f"{document}: {target}" for document, target, path, anchor in found if broken(path, anchor)] == []


def test_every_cited_document_and_anchor_exists():
    found = list(citations())
    assert len(found) >= 10
    assert [f"{source}: docs/{name}" + (f"#{anchor}" if anchor else "") for source, name, anchor in found
            if broken(REPO / "docs" / name, anchor)] == []


def test_the_checks_catch_a_missing_file_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n```\n# not a heading\n```\n")
    assert not broken(page, "a-heading")
    assert broken(page, "not-a-heading")
    assert broken(tmp_path / "absent.md", None)


def test_the_results_index_lists_every_results_page():
    index = REPO / "docs" / "results" / "README.md"
    listed = {(index.parent / target.partition("#")[0]).resolve()
              for target in LINK.findall(index.read_text()) if not re.match(r"[a-z]+:", target)}
    pages = set((REPO / "docs" / "results").glob("*/RESULTS.md"))
    assert pages and {page.resolve() for page in pages} <= listed
    assert all((page.parent / "results.json").is_file() for page in pages)


def test_the_calibration_notebook_is_linked_from_the_results_index_only():
    notebook = (REPO / "docs" / "notebook" / "CALIBRATION.md").resolve()
    linking = {str(document) for document, _, path, _ in links() if path.resolve() == notebook}
    assert linking <= {"docs/results/README.md", "docs/notebook/CALIBRATION.md"}
    assert "docs/results/README.md" in linking
