"""The Colab twins (scripts/make_twins.py): plain markdown that reads like the rendered chapter, the build's
numbers in the prose, a setup cell that stops when it cannot install, and notebooks that run on their own."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_twins", ROOT / "scripts" / "make_twins.py")
make_twins = importlib.util.module_from_spec(_spec)
sys.modules["make_twins"] = make_twins  # dataclasses look their module up while the class is made
_spec.loader.exec_module(make_twins)

TWINS = sorted((ROOT / "book" / "chapters").glob("*.ipynb"))
SITE = "https://owner.github.io/repo/"
PAGE = f"{SITE}book/chapters/c.html"
REFS = f"{SITE}book/reference/references.html"
BOOK = make_twins.Book(
    site=SITE,
    sections={"chapter-c": ("Chapter C", PAGE), "sec-x": ("A section", f"{PAGE}#sec-x")},
    figures={"fig-a": ("Fig. 3", f"{PAGE}#fig-a")},
    citations={"k1": "Smith et al., 2020", "k2": "Jones, 2021"},
    references_url=REFS,
)
CHAPTER = ROOT / "book" / "chapters" / "paged.md"  # relative paths in directives start from its folder

# What MyST leaves behind if the converter missed it (checked outside code blocks: code may mention roles).
LEFTOVERS = {
    "role": re.compile(r"\{[a-zA-Z][\w:.-]*\}`"),
    "directive": re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\s*\{", re.M),
    "label line": re.compile(r"^\s*\([^)\s]+\)=\s*$", re.M),
    "colon fence": re.compile(r"^\s*:::", re.M),
    "directive option": re.compile(r"^\s*:[\w-]+:(\s|$)", re.M),
}
CODE_BLOCK = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?^ {0,3}\1\s*$", re.M | re.S)


def convert(text: str, values: dict | None = None) -> str:
    return make_twins.Converter(BOOK, CHAPTER, values or {}).markdown(text)


# --- Every committed twin ---------------------------------------------------------------------------------------


def test_twins_exist_for_every_chapter():
    assert [p.with_suffix(".ipynb") for p in make_twins.chapters()] == TWINS


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_twin_markdown_has_no_myst_left(path: Path):
    nb = nbformat.read(path, as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        prose = CODE_BLOCK.sub("", cell.source)
        for what, pattern in LEFTOVERS.items():
            found += [f"{path.name} cell {i} ({cell.id}): {what}: {m.group(0)!r}" for m in pattern.finditer(prose)]
    assert not found, "MyST left in the twin's markdown:\n" + "\n".join(found)


@pytest.mark.parametrize("path", TWINS, ids=lambda p: p.stem)
def test_twin_shows_every_number_it_stores(path: Path):
    """The prose has no hole where a value was, and the twin stores exactly the values it shows."""
    nb = nbformat.read(path, as_version=4)
    stored = nb.metadata["peftlab"][make_twins.VALUES_KEY]
    md = path.with_suffix(".md").read_text()
    used = {content.split(":")[0] for content in re.findall(r"\{glue:(?:text|md)\}`([^`]+)`", md)}
    used |= set(re.findall(r"^`{3,}\{glue:md\}\s+(\S+)", md, re.M))  # glued blocks, e.g. a GPU section
    assert used == set(stored)
    assert "Numbers in the text are those of the book's build" in nb.cells[1].source


def test_twin_regenerates_byte_identical():
    md = CHAPTER
    values = make_twins.stored_values(md.with_suffix(".ipynb"))
    first, second = make_twins.twin(md, values), make_twins.twin(md, values)
    assert first == second == md.with_suffix(".ipynb").read_text()


def test_paged_twin_runs_alone_and_shows_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fastest chapter's twin, run top to bottom from an empty folder outside the repository in a plain
    python3 kernel of this venv: no cell fails, and every cell that saves a figure displays it."""
    from nbclient import NotebookClient

    kernels = tmp_path / "jupyter" / "kernels" / "python3"  # this interpreter's kernel, not a user-wide python3
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("PEFTLAB_BOOK_BUILD", raising=False)  # a reader's kernel, not the book's build
    workdir = tmp_path / "run"
    workdir.mkdir()
    assert not workdir.resolve().is_relative_to(ROOT)
    nb = nbformat.read(CHAPTER.with_suffix(".ipynb"), as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    print(f"paged twin ran in {time.perf_counter() - start:.1f} s")
    saving = {name: cell for cell in nb.cells if cell.cell_type == "code"
              for name in re.findall(r"save_figure\(\s*\w+\s*,\s*[\"']([a-z0-9-]+)[\"']", cell.source)}
    assert saving, "the paged chapter saves a figure"
    missing = [name for name, cell in saving.items()
               if not any("image/png" in out.get("data", {}) for out in cell.outputs)]
    assert not missing, f"figures saved but not displayed in the twin: {missing}"


# --- The setup cell -----------------------------------------------------------------------------------------------


def run_setup(monkeypatch: pytest.MonkeyPatch, colab: bool, pip_returncode: int = 0) -> list[list[str]]:
    """Execute the setup cell's code here, faking Colab and pip; returns the pip command lines it ran."""
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, pip_returncode, stdout="", stderr="ERROR: no such repository")

    monkeypatch.setattr(subprocess, "run", fake_run)
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(compile(make_twins.setup_cell().source, "setup", "exec"), {})
    return calls


def test_setup_on_colab_pins_the_checked_versions_and_leaves_torch(monkeypatch, capsys):
    (cmd,) = run_setup(monkeypatch, colab=True)
    requirements = (ROOT / "requirements.txt").read_text()
    url, branch = make_twins.repository()
    assert f"peftlab[book] @ git+{url}@{branch}" in cmd
    for name in ("bitsandbytes", "peft", "transformers"):
        pin = re.search(rf"^{name}==\S+", requirements, re.M).group(0)
        assert pin in cmd
    assert not any(arg.startswith("torch") for arg in cmd)
    assert "device" in capsys.readouterr().out  # describe_environment ran


def test_setup_stops_naming_the_url_when_the_install_fails(monkeypatch):
    url, _ = make_twins.repository()
    with pytest.raises(RuntimeError, match=re.escape(f"could not install peftlab from {url}")):
        run_setup(monkeypatch, colab=True, pip_returncode=1)


def test_setup_outside_colab_says_how_to_install_when_peftlab_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "peftlab", None)  # makes `import peftlab` raise ImportError
    with pytest.raises(RuntimeError, match=r"pip install -r requirements\.txt"):
        run_setup(monkeypatch, colab=False)


# --- The converter, one construct at a time -----------------------------------------------------------------------


@pytest.mark.parametrize("text, plain, expected", [
    ("{glue:text}`n:,`", "869504", "869,504"),
    ("{glue:text}`n:,.0f`", "1685.2", "1,685"),
    ("{glue:text}`n:.2f`", "0.123456", "0.12"),
    ("{glue:text}`n:.1%`", "0.123456", "12.3%"),
    ("{glue:text}`n:.3g`", "0.0", "0"),
    ("{glue:text}`n`", "256", "256"),
    ("{glue:text}`n`", "'exact'", "exact"),  # a glued str shows without its quotes
])
def test_glue_text_is_formatted_as_myst_nb_formats_it(text, plain, expected):
    assert convert(text, {"n": {"text/plain": plain}}) == expected


def test_glue_md_pastes_the_markdown_value():
    assert convert("It is {glue:md}`v`.", {"v": {"text/markdown": "**not** equal\n"}}) == "It is **not** equal."


def test_a_value_missing_from_build_and_twin_fails_naming_the_key():
    with pytest.raises(make_twins.MissingValue, match="'paged-gone'"):
        convert("{glue:text}`paged-gone:.2f`", {})


def test_converter_records_only_the_values_and_forms_it_showed():
    values = {"a": {"text/plain": "1"}, "b": {"text/plain": "2"},
              "c": {"text/plain": "<IPython.core.display.Markdown object>", "text/markdown": "*x*"}}
    converter = make_twins.Converter(BOOK, CHAPTER, values)
    converter.markdown("{glue:text}`a` {glue:md}`c`")
    assert converter.used == {"a": {"text/plain": "1"}, "c": {"text/markdown": "*x*"}}


def test_ref_becomes_the_section_title_linked_into_the_site():
    assert convert("see {ref}`sec-x`") == f"see [A section]({PAGE}#sec-x)"
    assert convert("{ref}`the chapter <chapter-c>`") == f"[the chapter]({PAGE})"


def test_numref_becomes_the_figure_number_linked_into_the_site():
    assert convert("{numref}`fig-a` shows") == f"[Fig. 3]({PAGE}#fig-a) shows"
    assert convert("{numref}`Figure %s <fig-a>`") == f"[Figure 3]({PAGE}#fig-a)"


def test_a_reference_to_an_unknown_label_fails():
    with pytest.raises(make_twins.TwinError, match="fig-nope"):
        convert("{numref}`fig-nope`")


def test_cite_becomes_author_year_linked_to_the_references():
    assert convert("{cite}`k1,k2`") == f"([Smith et al., 2020]({REFS}#cite-k1); [Jones, 2021]({REFS}#cite-k2))"


def test_author_year_names_one_two_or_first_et_al():
    from pybtex.database import Person

    from peftlab.book.citations import author_year

    assert author_year([Person("Kalajdzievski, Damjan")], "2023") == "Kalajdzievski, 2023"
    assert (author_year([Person("Dettmers, Tim"), Person("{the bitsandbytes contributors}")], "2021")
            == "Dettmers and the bitsandbytes contributors, 2021")
    assert (author_year([Person("Rozi{\\`e}re, Baptiste"), Person("A, B"), Person("C, D")], "2023")
            == "Rozière et al., 2023")


def test_two_entries_that_would_share_a_label_get_a_and_b_in_bibliography_order():
    from pybtex.database import BibliographyData, Entry, Person

    from peftlab.book.citations import bibliography_labels

    three = {"author": [Person("Dettmers, Tim"), Person("A, B"), Person("C, D")]}
    bib = BibliographyData({
        "late": Entry("misc", [("year", "2023"), ("title", "Zeta")], persons=three),
        "early": Entry("misc", [("year", "2023"), ("title", "Alpha")], persons=three),
        "alone": Entry("misc", [("year", "2022"), ("title", "LoRA")], persons={"author": [Person("Hu, Edward")]}),
    })
    assert bibliography_labels(bib) == {"early": "Dettmers et al., 2023a", "late": "Dettmers et al., 2023b",
                                        "alone": "Hu, 2022"}


def test_book_citations_come_from_the_bibliography():
    from pybtex.database import parse_file

    from peftlab.book.citations import bibliography_labels

    shown = bibliography_labels(parse_file(str(ROOT / "book" / "references.bib")))
    assert make_twins.Book.load().citations["dettmers2023qlora"] == shown["dettmers2023qlora"]
    assert shown["dettmers2023qlora"].startswith("Dettmers et al., 2023")


def test_math_and_code_roles_become_markdown():
    assert convert("{math}`x^2` and {code}`f()`") == "$x^2$ and `f()`"


def test_label_lines_are_dropped():
    assert convert("(sec-x)=\n## A section") == "## A section"


def test_dropdown_admonition_becomes_details_with_blank_lines():
    text = "```{admonition} Math\n:class: note, dropdown\nSee {ref}`sec-x`.\n```"
    assert convert(text) == (f"<details>\n<summary>Math</summary>\n\nSee [A section]({PAGE}#sec-x).\n\n</details>")


def test_admonition_becomes_blockquote_with_display_math_on_one_line():
    text = "````{admonition} Correction\n:class: warning\nWrong:\n\n$$\na\n= b\n$$\n\n```python\nx = 1\n```\n````"
    assert convert(text) == "> **Correction**\n>\n> Wrong:\n>\n> $$ a = b $$\n>\n> ```python\n> x = 1\n> ```"


def test_named_admonition_takes_its_title_from_the_directive():
    assert convert("```{note}\nHello.\n```") == "> **Note**\n>\n> Hello."


def test_align_becomes_aligned_inside_display_math():
    assert convert("$$\\begin{align}\na &= b\n\\end{align}$$") == "$$\\begin{aligned}\na &= b\n\\end{aligned}$$"


def test_code_blocks_and_inline_code_are_left_alone():
    text = "```python\n{glue:text}`x`\n(sec-x)=\n```\nwrite `{cite}` like ``{cite}`key` ``"
    assert convert(text) == text


def test_literalinclude_inlines_the_object_under_a_line_naming_it():
    import peftlab.measure

    text = ("```{literalinclude} ../../src/peftlab/measure.py\n:pyobject: count_saved_bytes\n"
            ":caption: src/peftlab/measure.py — a step's activation memory\n```")
    source = inspect.getsource(peftlab.measure.count_saved_bytes).rstrip()
    assert convert(text) == (f"`src/peftlab/measure.py`, `count_saved_bytes` — a step's activation memory\n\n"
                             f"```python\n{source}\n```")


def test_literalinclude_lines_select_within_the_object():
    import peftlab.measure

    text = "```{literalinclude} ../../src/peftlab/measure.py\n:pyobject: count_saved_bytes\n:lines: 1-3\n```"
    first3 = "\n".join(inspect.getsource(peftlab.measure.count_saved_bytes).splitlines()[:3])
    assert convert(text) == f"`src/peftlab/measure.py`, `count_saved_bytes` (lines 1-3)\n\n```python\n{first3}\n```"


def test_include_is_inlined_and_converted(tmp_path: Path):
    (tmp_path / "snippet.md").write_text("```{admonition} A note\n:class: seealso\n\nRuns on a CPU.\n```\n")
    chapter = tmp_path / "chapter.md"  # the include's path starts from the chapter's folder
    out = make_twins.Converter(BOOK, chapter, {}).markdown("```{include} snippet.md\n```")
    assert out.startswith("> **A note**\n>\n> Runs on a CPU")
    assert "```" not in out and ":class:" not in out


def test_glue_figure_becomes_its_numbered_caption():
    text = "```{glue:figure} a\n:name: fig-a\n\n{glue:md}`a-caption`\n```"
    assert convert(text, {"a-caption": {"text/markdown": "What it shows."}}) == "*Fig. 3 — What it shows.*"


def test_glued_myst_block_is_converted_with_its_figures_numbered():
    section = "```{figure} ../../_static/figures/x-gpu.svg\n:name: fig-a\n\nTimings. Measured on a GPU.\n```\n\nSee {cite}`k1`."
    text = convert("```{glue:md} gpu-section\n:format: myst\n```", {"gpu-section": {"text/markdown": section}})
    assert text == f"*Fig. 3 — Timings. Measured on a GPU.*\n\nSee ([Smith et al., 2020]({REFS}#cite-k1))."


def test_figures_inside_glued_blocks_take_their_place_in_the_numbering():
    text = ("```{glue:figure} one\n:name: fig-one\n\ncap\n```\n\n```{glue:md} section\n:format: myst\n```\n\n"
            "```{glue:figure} three\n:name: fig-three\n\ncap\n```\n")
    values = {"section": {"text/markdown": "```{figure} a.svg\n:name: fig-two\n\ncap\n```"}}
    assert make_twins.figure_labels(text, values) == ["fig-one", "fig-two", "fig-three"]
    assert make_twins.figure_labels(text, {}) == ["fig-one", "fig-three"]  # no record: no figure


def test_unknown_role_or_directive_fails_instead_of_leaking_myst():
    with pytest.raises(make_twins.TwinError, match="role"):
        convert("{sup}`2`")
    with pytest.raises(make_twins.TwinError, match="directive"):
        convert("```{sidebar} x\n```")


@pytest.mark.parametrize("url, site", [
    ("https://github.com/peftlab/peftlab-book", "https://peftlab.github.io/peftlab-book/"),
    ("https://github.com/PeftLab/peftlab-book/", "https://peftlab.github.io/peftlab-book/"),
    ("https://github.com/peftlab/peftlab-book.git", "https://peftlab.github.io/peftlab-book/"),
])
def test_site_url_follows_github_pages(url, site):
    assert make_twins.site_url(url) == site


def test_site_url_refuses_a_non_github_repository():
    with pytest.raises(make_twins.TwinError, match="gitlab"):
        make_twins.site_url("https://gitlab.com/a/b")


def test_figure_numbers_match_the_rendered_book():
    """Fig. N of each figure label is what the built HTML shows (skipped before a build)."""
    html = ROOT / "_build" / "html" / "book" / "chapters"
    if not html.is_dir():
        pytest.skip("the book has not been built here")
    rendered = {}
    for page in html.glob("*.html"):
        for label, number in re.findall(r'<figure[^>]*id="(fig-[\w-]+)".*?caption-number">(Fig\. [\d.]+) </span>',
                                        page.read_text(), re.S):
            rendered[label] = number
    assert rendered, "no numbered figures found in the HTML"
    book = make_twins.Book.load(make_twins.executed_values)  # the build's values: its GPU sections too
    assert {label: number for label, (number, _) in book.figures.items()} == rendered


# --- --check and write mode, on a copy of the book ---------------------------------------------------------------


@pytest.fixture
def book_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of what the twins are made from, with make_twins pointed at it."""
    for name in ("_config.yml", "_toc.yml", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "book", tmp_path / "book")
    shutil.copytree(ROOT / "src" / "peftlab", tmp_path / "src" / "peftlab",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))  # literalinclude reads the sources
    monkeypatch.setattr(make_twins, "ROOT", tmp_path)
    monkeypatch.setattr(make_twins, "CHAPTERS", tmp_path / "book" / "chapters")
    monkeypatch.setattr(make_twins, "EXECUTED", tmp_path / "_build" / "jupyter_execute")
    return tmp_path


def fake_build(root: Path, chapter: str, values: dict[str, str]) -> None:
    """A build's glue record for ``chapter``, as myst-nb writes it, with the given text/plain values."""
    path = root / "_build" / "jupyter_execute" / "book" / "chapters" / f"{chapter}.glue.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({key: {"output_type": "display_data", "data": {"text/plain": text},
                                      "metadata": {"scrapbook": {"name": key}}} for key, text in values.items()}))


def test_check_ignores_numbers_that_moved_in_a_new_build(book_copy: Path, capsys):
    fake_build(book_copy, "paged", {"paged-run-s": "123.456"})
    assert make_twins.main(["--check"]) == 0, capsys.readouterr().out


def test_check_catches_changed_prose(book_copy: Path, capsys):
    md = book_copy / "book" / "chapters" / "paged.md"
    md.write_text(md.read_text().replace("## Bad input", "## Bad input, refused"))
    assert make_twins.main(["--check"]) == 1
    assert "book/chapters/paged.ipynb" in capsys.readouterr().out


def test_check_catches_a_new_value_the_twin_does_not_have(book_copy: Path, capsys):
    md = book_copy / "book" / "chapters" / "paged.md"
    md.write_text(md.read_text().replace("## Bad input", "## Bad input ({glue:text}`paged-new-key`)"))
    assert make_twins.main(["--check"]) == 1
    assert "paged-new-key" in capsys.readouterr().out


def test_write_takes_numbers_from_the_build(book_copy: Path):
    fake_build(book_copy, "paged", {"paged-run-s": "123.456"})
    assert make_twins.main([]) == 0
    twin = nbformat.read(book_copy / "book" / "chapters" / "paged.ipynb", as_version=4)
    assert twin.metadata["peftlab"][make_twins.VALUES_KEY]["paged-run-s"] == {"text/plain": "123.456"}
    assert "123.5 s" in "\n".join(c.source for c in twin.cells if c.cell_type == "markdown")
    assert make_twins.main(["--check"]) == 0


def test_write_fails_naming_a_key_neither_build_nor_twin_has(book_copy: Path):
    md = book_copy / "book" / "chapters" / "paged.md"
    md.write_text(md.read_text().replace("## Bad input", "## Bad input ({glue:text}`paged-new-key`)"))
    with pytest.raises(make_twins.MissingValue, match="'paged-new-key'"):
        make_twins.main([])


def test_write_without_a_build_keeps_the_numbers_stored_in_the_twins(book_copy: Path):
    twins = {p: p.read_text() for p in (book_copy / "book" / "chapters").glob("*.ipynb")}
    assert make_twins.main([]) == 0
    assert {p: p.read_text() for p in twins} == twins
