"""Every citation a reader can follow: no pointer to notes that live outside the repository, no dead relative link or
link to a section that is not there, no mention of a docs / benchmarks / tests file that does not exist, no section
named in quotes after a file that has no heading or bold lead-in of that name. A failure names file and line."""
import os
import re

from conftest import ROOT

PRIVATE_NOTES = "REF" + "ERENCE"  # spelled in two parts so this file does not report itself
SKIP_DIRS = {"runs", "__pycache__"}  # and every hidden folder (.git, .venv, ...)
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) or [text](target "title")
REPO_PATH = re.compile(r"(?<![\w./-])(docs/[\w.-]+\.(?:md|png)|benchmarks/\w+\.py|tests/\w+\.py)(?![\w/-])")
# The README or a docs page, then (after an optional comma) a heading or **bold** name in quotes, escaped or not
SECTION_REF = re.compile(r"(README|docs/[\w.-]+\.md)(?:'s)?,? \\?\"([^\"\\\n]+)\\?\"")


def sections(path):
    """(anchors, names) of a Markdown file: GitHub's anchor of each heading outside code blocks (lower case,
    punctuation dropped, spaces to hyphens, -1, -2, ... on repeats) and the names a reader can look for, headings and
    **bold** lead-ins."""
    anchors, names, seen, code = set(), set(), {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            code ^= line.lstrip().startswith("```")
            heading = None if code else re.match(r"#{1,6}\s+(.*?)\s*$", line)
            if heading:
                names.add(heading[1])
                slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
                anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
                seen[slug] = seen.get(slug, 0) + 1
            names.update(re.findall(r"\*\*([^*]+)\*\*", line))
    return anchors, names


def walk(root):
    """The repository's *.py and *.md files, as paths relative to root."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith((".py", ".md")):
                yield os.path.relpath(os.path.join(folder, name), root)


def problems(root):
    """One 'file:line: what' string per citation that points outside the repository or to nothing."""
    found = []
    for rel in walk(root):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines, start=1):
            where = f"{rel}:{number}"
            if re.search(rf"\b{PRIVATE_NOTES}\b", line):
                found.append(f"{where}: cites private notes ({PRIVATE_NOTES}); cite the paper, upstream code or a test")
            reported = set()  # root-relative paths already reported on this line
            if rel.endswith(".md"):
                for target in dict.fromkeys(MD_LINK.findall(line)):
                    path = target.split("#", 1)[0]
                    if re.match(r"^[a-z][a-z0-9+.-]*:", path):  # http(s), mailto, ...
                        continue
                    full = os.path.normpath(os.path.join(os.path.dirname(rel), path)) if path else rel
                    if full not in reported and not os.path.exists(os.path.join(root, full)):
                        found.append(f"{where}: link to {target}, which does not exist")
                        reported.add(full)
                    elif "#" in target and full.endswith(".md") and \
                            target.split("#", 1)[1] not in sections(os.path.join(root, full))[0]:
                        found.append(f"{where}: link to {target}, whose section does not exist")
            for path in dict.fromkeys(REPO_PATH.findall(line)):
                if path not in reported and not os.path.exists(os.path.join(root, path)):
                    found.append(f"{where}: mentions {path}, which does not exist")
                    reported.add(path)
            for path, name in SECTION_REF.findall(line):
                path = "README.md" if path == "README" else path
                if path not in reported and os.path.exists(os.path.join(root, path)) and \
                        name not in sections(os.path.join(root, path))[1]:
                    found.append(f"{where}: names the section \"{name}\" of {path}, which has none of that name")
    return found


def test_every_citation_points_inside_the_repository():
    found = problems(ROOT)
    assert not found, "citations a reader cannot follow:\n" + "\n".join(found)


def _write(root, rel, text):
    os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
    with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
        f.write(text)


def test_the_check_reports_each_kind_with_file_and_line(tmp_path):
    """A scratch repository with one bad citation of each kind; each is reported at its line, and the fixed tree is
    clean. Paths are assembled from parts so that this file's own text mentions none of them."""
    root, docs, notes = str(tmp_path), "docs", PRIVATE_NOTES
    page, gone, missing_doc = f"{docs}/page.md", f"{docs}/gone.md", f"{docs}/nowhere.md"
    missing_bench, missing_test = "benchmarks" + "/nowhere.py", "tests" + "/nowhere.py"
    readme = "READ" + "ME"
    _write(root, page, "# Page\n\nSee [the README](../README.md#quick-start) and [nothing](gone.md).\n"
                       "```\n# Not a heading\n```\n- **Point data**: ...\n")
    _write(root, "README.md", f"# R\n\n[page]({page}), [web](https://example.org/x.md), [top](#r)\n"
                              f"Proof: {notes} §1.2.\nRun {missing_bench}; see {missing_doc}.\n"
                              f"[a](#quick-start), [b]({page}#not-a-heading), [c]({page}#page)\n")
    _write(root, "tool.py", f'"""Tested in {missing_test}."""\nx = 1  # {notes}.md\n'
                            f'# {readme} "R"; {page}, "Point data"; {page} "Points"; {readme}, \\"Quick start\\"\n')
    _write(root, "runs/old/notes.md", f"{notes} [dead](dead.md)\n")  # run folders are not the repository's
    found = sorted(problems(root))
    assert found == [
        f"README.md:4: cites private notes ({notes}); cite the paper, upstream code or a test",
        f"README.md:5: mentions {missing_bench}, which does not exist",
        f"README.md:5: mentions {missing_doc}, which does not exist",
        "README.md:6: link to #quick-start, whose section does not exist",
        f"README.md:6: link to {page}#not-a-heading, whose section does not exist",
        f"{page}:3: link to ../README.md#quick-start, whose section does not exist",
        f"{page}:3: link to gone.md, which does not exist",
        f"tool.py:1: mentions {missing_test}, which does not exist",
        f"tool.py:2: cites private notes ({notes}); cite the paper, upstream code or a test",
        f"tool.py:3: names the section \"Points\" of {page}, which has none of that name",
        "tool.py:3: names the section \"Quick start\" of README.md, which has none of that name",
    ], found
    _write(root, gone, "# Gone\n")
    _write(root, "README.md", f"# R\n\n[page]({page}), [web](https://example.org/x.md), [top](#r)\n"
                              f"Proof: arXiv:2410.11081v1; see {page}.\n\n## Quick start\n\n[c]({page}#page)\n")
    _write(root, "tool.py", f'# {readme} "R"; {page}, "Point data"; {readme}, \\"Quick start\\"\n')
    assert problems(root) == []
