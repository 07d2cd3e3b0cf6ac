"""The book's machinery: the table of contents, Colab twins, glue keys, figures, citations, CI commands."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC.get("parts", [{"chapters": TOC.get("chapters", [])}]):
        files += [entry["file"] for entry in part["chapters"]]
    return files


CHAPTERS = [ROOT / f"{f}.md" for f in toc_files() if f.startswith("book/chapters/")]
ROLE = re.compile(r"\{glue(?::text|:md)?\}`([^`:]+)(?::[^`]*)?`")
FIGURE = re.compile(r"^```\{glue:figure\}\s+(\S+)", re.M)


def defined_keys(md: Path) -> list[re.Pattern[str]]:
    """Patterns of every glue key the chapter's code defines (f-strings become wildcards)."""
    patterns = []
    for cell in jupytext.read(md).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            position = {"glue": 0, "claim": 0, "save_figure": 1}.get(name)
            if position is None or len(node.args) <= position:
                continue
            arg = node.args[position]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                regex = re.escape(arg.value)
            elif isinstance(arg, ast.JoinedStr):
                regex = "".join(
                    re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in arg.values
                )
            else:
                continue
            patterns.append(re.compile(regex + "$"))
            if name == "claim":
                patterns.append(re.compile(regex + "-expected$"))
            if name == "save_figure":
                patterns.append(re.compile(regex + "-caption$"))
    return patterns


def string_args(md: Path, function: str, position: int) -> set[str]:
    """The constant strings passed as argument ``position`` to ``function(...)`` in the chapter's code."""
    found = set()
    for cell in jupytext.read(md).cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == function
                    and len(node.args) > position and isinstance(node.args[position], ast.Constant)):
                found.add(node.args[position].value)
    return found


def figure_names(md: Path) -> set[str]:
    """Every figure the chapter saves: ``save_figure(fig, "<name>", ...)``."""
    return string_args(md, "save_figure", 1)


def test_every_toc_entry_exists():
    missing = [f for f in toc_files() if not (ROOT / f"{f}.md").is_file()]
    assert not missing, f"in _toc.yml but not on disk: {missing}"


def test_twins_are_in_sync():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_twins.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for md in CHAPTERS:
        assert md.with_suffix(".ipynb").is_file(), f"{md.name} has no Colab twin"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_conventions(md: Path):
    text = md.read_text()
    assert "from myst_nb import glue" not in text, "use peftlab.book.runtime.glue (myst-nb is not on Colab)"
    assert f'start_chapter("{md.stem}"' in text, f"{md.name} must call start_chapter({md.stem!r}, ...)"
    assert re.search(r"^\(chapter-[a-z0-9-]+\)=$", text, re.M), f"{md.name} has no (chapter-...)= label"
    header = text.split("\n---\n", 1)[0]
    assert re.search(r"^  execution_timeout: \d+", header, re.M), f"{md.name} sets no per-notebook timeout"
    if re.search(r"^  gpu: true", header, re.M):
        assert "{ref}`intro-gpu`" in text, f"{md.name} has GPU cells but no pointer to the introduction's GPU note"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_every_glue_key_in_prose_is_defined(md: Path):
    text = md.read_text()
    used = set(ROLE.findall(text)) | set(FIGURE.findall(text))
    patterns = defined_keys(md)
    undefined = sorted(k for k in used if not any(p.match(k) for p in patterns))
    assert not undefined, f"{md.name} uses glue keys no cell defines: {undefined}"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_every_figure_is_exported_named_and_referenced(md: Path):
    text = md.read_text()
    placed, exported = set(FIGURE.findall(text)), figure_names(md)
    # A figure drawn from a GPU record is placed by the glued section that exists only with the record.
    placed_if_recorded = string_args(md, "figure_markdown", 0)
    assert placed <= exported, f"placed but not saved with save_figure: {sorted(placed - exported)}"
    assert exported <= placed | placed_if_recorded, (
        f"saved but never placed with {{glue:figure}} or figure_markdown: {sorted(exported - placed)}")
    for name in placed:
        assert f":name: fig-{name}" in text, f"figure {name} has no :name: fig-{name}"
        assert f"{{numref}}`fig-{name}`" in text, f"figure {name} is never referenced with {{numref}}"


def test_every_citation_is_in_the_bibliography():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, re.M))
    for required in ("hu2021lora", "dettmers2023qlora", "kalajdzievski2023rslora", "touvron2023llama",
                     "bitsandbytes", "peft"):
        assert required in keys
    cited = set()
    for md in (ROOT / "book").rglob("*.md"):
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", md.read_text()):
            cited |= {k.strip() for k in group.split(",")}
    assert cited <= keys, f"cited but not in references.bib: {sorted(cited - keys)}"


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(python3 -m venv .+)\n```", readme)
    assert len(commands) == 2, "README must open with the build command and the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in ci
    for command in commands:
        assert command in ci.splitlines(), f".ci/run does not run the README command: {command}"


def test_requirements_pin_exactly():
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert "torch==2.13.0" in lines
    loose = [l for l in lines if l != "-e .[book,reference]" and "==" not in l]
    assert not loose, f"requirements.txt must pin exactly: {loose}"


def test_publishing_workflow_builds_with_the_readme_command_and_deploys_pages():
    readme = (ROOT / "README.md").read_text()
    build = re.findall(r"```bash\n(python3 -m venv .+scripts/build_book.py)\n```", readme)
    assert len(build) == 1
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    assert [s["run"] for s in steps if "run" in s] == build
    assert any(s.get("uses", "").startswith("actions/upload-pages-artifact") and s["with"]["path"] == "_build/html"
               for s in steps)
    assert any(s.get("uses", "").startswith("actions/deploy-pages") for s in workflow["jobs"]["deploy"]["steps"])
    assert workflow["permissions"]["pages"] == "write"


def test_the_repository_url_is_set_once_and_the_citation_agrees():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["repository-code"] == config["repository"]["url"]


def test_the_package_has_no_import_cycle_and_no_layer_imports_above_itself():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "module_graph.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no cycles" in result.stdout


def test_module_graph_finds_a_cycle_and_an_import_up_the_layers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("module_graph", ROOT / "scripts" / "module_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    assert graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert graph.cycles({"a": {"b"}, "b": set()}) == []
    assert graph.layer("peftlab.lora") < graph.layer("peftlab.harness.experiments") < graph.layer("peftlab.book.claims")


def test_module_graph_sees_imports_hidden_in_strings_and_refuses_private_and_computed_ones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("module_graph", ROOT / "scripts" / "module_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    modules = {"peftlab.lora", "peftlab.harness.experiments", "peftlab.qlora"}
    source = ('import importlib\nTARGET = "peftlab.harness.experiments.finetune"\n'
              'from peftlab.qlora import _private\nimportlib.import_module(TARGET)\n')
    assert graph.imports_in(source, "peftlab.lora", "peftlab", modules) >= {"peftlab.harness.experiments"}
    found = graph.problems_in(source, "peftlab.lora", modules)
    assert any("private import" in line and "_private" in line for line in found)
    assert any("hidden import" in line and "import_module" in line for line in found)
    assert graph.problems_in("import importlib\nimportlib.import_module('json')\n", "peftlab.lora", modules) == []


def test_the_package_is_formatted_at_the_page_width():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (requirements.txt installs it)")
    for args in (["format", "--check"], ["check"]):
        result = subprocess.run([str(ruff), *args, "--no-cache", str(ROOT / "src")], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
