"""Prose that follows its numbers: no sentence judges a glued number in words fixed in advance.

A chapter's numbers come from its code, so they change with the machine that runs it (a CPU's instruction set
picks bitsandbytes' kernels; timings, rounding and thread counts differ). A sentence that interprets such a number
("returns 0 wrong values", "fails: none", "3.4 GB/s, the physical limit") must follow it. Either

- the words are chosen by the value in code and glued as Markdown (``glue(key, Markdown(text))``, shown with
  ``{glue:md}`key```), where this scan does not see them; or
- the number is guarded by a ``claim(...)`` that fails the book when the value contradicts the words: it is a
  claim's key (or ``<key>-expected``), or it is glued from a variable that a claim in the chapter checks.

The scan flags a ``{glue:text}`` number that is not guarded and has a verdict word (``VERDICTS``) within ``WINDOW``
words of it in the same sentence. Pure text and the code cells' syntax trees: nothing is executed.
"""

from __future__ import annotations

import ast
import builtins
import re
import warnings
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ["nf4", "double_quant", "qlora", "stack", "memory", "paged", "lora"]

# Words that judge a number: a comparison, a pass/fail, a reproduction, an exactness.
VERDICTS = re.compile(
    r"\b(none|nothing|fail(?:s|ed|ing)?|reproduc(?:e|es|ed|ing|ible)|exact(?:ly)?|wrong(?:ly)?|misplaced|fault|"
    r"defect|bug|limits?|more|less|fewer|faster|slower|larger|smaller|higher|lower|above|below|within|inside|"
    r"outside|beats?|best|worst|better|worse|lowest|highest|identical|agrees?|correct(?:ly)?|negligible|"
    r"exceeds?)\b",
    re.IGNORECASE,
)
WINDOW = 12  # words on either side of the number, within its sentence

GLUE_ROLE = re.compile(r"\{glue(?::(text|md))?\}`([^`:]+)(?::[^`]*)?`")
OTHER_ROLE = re.compile(r"\{[a-zA-Z][\w:.-]*\}`[^`]*`")
CODE_SPAN = re.compile(r"(`+).+?(?<!`)\1(?!`)")
INLINE_MATH = re.compile(r"\$[^$]+\$")
FENCE = re.compile(r"^\s{0,3}(`{3,}|:{3,})\s*(\{[^}]*\})?")
PROSE_DIRECTIVES = {"{admonition}", "{note}", "{warning}", "{tip}", "{important}", "{attention}", "{caution}",
                    "{hint}", "{seealso}"}
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z«*_(\[\"'])|(?<=;)\s+")
WORD = re.compile(r"«[^»]+»|[A-Za-z][A-Za-z'-]*")
IGNORED_NAMES = set(dir(builtins)) | {"torch", "math", "np", "F", "nn"}


def paragraphs(text: str) -> list[tuple[int, str]]:
    """The chapter's prose, paragraph by paragraph (list items apart), with each one's first line number: no front
    matter, code cells, other directives' bodies, display math, labels, options or comments."""
    lines = text.split("\n")
    start = 0
    if lines and lines[0].strip() == "---":
        start = lines.index("---", 1) + 1
    out: list[tuple[int, list[str]]] = []
    current: list[str] = []
    first = 0
    fence: str | None = None
    keep = False
    in_math = False

    def flush() -> None:
        nonlocal current
        if current:
            out.append((first, current))
        current = []

    for number, line in enumerate(lines[start:], start + 1):
        opener = FENCE.match(line)
        if fence is None and opener:
            flush()
            fence, keep = opener.group(1), (opener.group(2) or "") in PROSE_DIRECTIVES
            continue
        if fence is not None and line.strip() == fence:
            flush()
            fence, keep = None, False
            continue
        if fence is not None and not keep:
            continue
        stripped = line.strip()
        if in_math:
            in_math = "$$" not in stripped
            continue
        if stripped.startswith("$$"):
            flush()
            in_math = stripped.count("$$") == 1
            continue
        if (not stripped or re.match(r"^:[\w-]+:", stripped) or re.match(r"^\([^)\s]+\)=$", stripped)
                or stripped.startswith("%")):
            flush()
            continue
        if LIST_ITEM.match(line):
            flush()
        if not current:
            first = number
        current.append(stripped)
    flush()
    return [(n, " ".join(ls)) for n, ls in out]


def sentences(text: str) -> list[tuple[int, str]]:
    """Sentences of the prose, with glue roles as «text:key» / «md:key» and other roles, code and math blanked."""
    found = []
    for number, para in paragraphs(text):
        para = GLUE_ROLE.sub(lambda m: f"«{m.group(1) or 'text'}:{m.group(2)}»", para)
        para = OTHER_ROLE.sub(" REF ", para)
        para = CODE_SPAN.sub(" CODE ", para)
        para = INLINE_MATH.sub(" MATH ", para)
        found += [(number, s.strip()) for s in SENTENCE_END.split(para) if s.strip()]
    return found


def _key_pattern(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in node.values)
    return None


def _names(node: ast.AST) -> set[str]:
    """Variables an expression reads: not called functions, comprehension variables or builtins."""
    called = {n.func.id for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    bound = {t.id for c in ast.walk(node) if isinstance(c, ast.comprehension)
             for t in ast.walk(c.target) if isinstance(t, ast.Name)}
    read = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return read - called - bound - IGNORED_NAMES


def guarded_keys(text: str) -> list[re.Pattern[str]]:
    """Patterns of the glue keys a claim guards: every claim's key and ``-expected`` key, and every key glued from a
    variable that some claim's measured value, expected value or tolerance reads."""
    calls: list[ast.Call] = []
    for cell in jupytext.reads(text, fmt="md:myst").cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!")))
        with warnings.catch_warnings():  # a chapter's own string escapes are not this test's business
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(source)
        calls += [n for n in ast.walk(tree) if isinstance(n, ast.Call)]

    def named(call: ast.Call, name: str) -> bool:
        return getattr(call.func, "id", getattr(call.func, "attr", None)) == name

    patterns, claimed = [], set()
    for call in calls:
        if named(call, "claim") and call.args and (key := _key_pattern(call.args[0])):
            patterns += [key, key + "-expected"]
            checked = call.args[1:3] + [k.value for k in call.keywords if k.arg in ("rel", "abs")]
            for arg in checked:
                claimed |= _names(arg)
    for call in calls:
        if named(call, "glue") and len(call.args) >= 2 and (key := _key_pattern(call.args[0])):
            if _names(call.args[1]) & claimed:
                patterns.append(key)
    return [re.compile(p + "$") for p in patterns]


def unguarded_verdicts(text: str) -> list[str]:
    """Each sentence where a verdict word sits within ``WINDOW`` words of an unguarded {glue:text} number."""
    guarded = guarded_keys(text)
    found = []
    for number, sentence in sentences(text):
        words = WORD.findall(sentence)
        keys, near = [], set()
        for i, word in enumerate(words):
            if not word.startswith("«text:"):
                continue
            key = word[len("«text:"):-1]
            if any(p.match(key) for p in guarded):
                continue
            verdicts = {w.lower() for w in words[max(0, i - WINDOW): i + WINDOW + 1]
                        if not w.startswith("«") and VERDICTS.fullmatch(w)}
            if verdicts:
                keys.append(key)
                near |= verdicts
        if keys:
            found.append(f"line {number}: {keys} beside {sorted(near)}: {sentence}")
    return found


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_no_verdict_beside_an_unguarded_number(chapter):
    text = (ROOT / "book" / "chapters" / f"{chapter}.md").read_text()
    found = unguarded_verdicts(text)
    assert not found, (
        "a sentence judges a glued number in fixed words; choose the words in code and glue them as Markdown, or "
        "guard the number with claim(...):\n" + "\n".join(found))


def chapter(code: str, prose: str) -> str:
    return f"```{{code-cell}} python\n{code}\n```\n\n{prose}\n"


# Sentences as the chapters had them before they followed their numbers; each contradicted its glued value on a
# machine where a bitsandbytes defect does not reproduce, or compared numbers of different experiments.
OLD = {
    "a defect's output, fixed words": chapter(
        'glue("stack-down-error", odd_error)\nglue("stack-repack-error", repack_error)',
        "It stores the same bytes, but in training mode the CPU kernel dequantizes them with misplaced block "
        "scales: the output is off by {glue:text}`stack-down-error:.0%` (relative). In inference mode it first "
        "repacks the weight for its AVX-512 kernel, which needs rows that are whole blocks, and fails: "
        "*{glue:text}`stack-repack-error`*."),
    "a count of wrong values": chapter(
        'glue("nf4-bnb-bug-count", int((native != ours).sum()))',
        "In that example bitsandbytes' CPU kernel returns {glue:text}`nf4-bnb-bug-count` wrong values."),
    "a rate called a limit": chapter(
        'glue("nf4-dq-gbps", moved / t)\nglue("nf4-copy-gbps", 2 * n / t_copy)',
        "Ours moves {glue:text}`nf4-dq-gbps:.1f` GB/s of bytes read and written, against "
        "{glue:text}`nf4-copy-gbps:.1f` GB/s for a plain copy, the physical limit."),
    "a fault that is not ours": chapter(
        'glue("qlora-bnb-down-diff", diffs["down_proj"])',
        "For `down_proj` it is {glue:text}`qlora-bnb-down-diff:.3g`, and the fault is not ours: its rows have "
        "352 entries."),
    "more, from another experiment": chapter(
        'glue("qlora-full-gain", full["initial_held_out_loss"] - full["held_out_loss"])',
        "Full finetuning learns more in the same steps ({glue:text}`qlora-full-gain:.3f` nats/byte): it moves "
        "every weight, with a rank-16 adapter the update is small."),
}


@pytest.mark.parametrize("case", list(OLD))
def test_the_scan_flags_sentences_that_did_not_follow_their_numbers(case):
    assert unguarded_verdicts(OLD[case])


def test_the_scan_accepts_words_chosen_in_code_and_numbers_a_claim_guards():
    chosen = chapter(
        'glue("count", n)\nglue("count-text", Markdown("no value differs" if n == 0 else f"{n} values differ"))',
        "Of {glue:text}`count` values compared, {glue:md}`count-text` and none of them is wrong.")
    assert unguarded_verdicts(chosen)  # "none" and "wrong" are fixed words beside an unguarded number
    assert not unguarded_verdicts(chosen.replace(" and none of them is wrong", ""))
    claimed = chapter(
        'claim("gap", worst, 1e-5, relation="<=", source="float32 rounding", what="gap")\n'
        'glue("gap-share", worst / total)\nglue("steps", STEPS)',
        "The logits agree to {glue:text}`gap` (bound {glue:text}`gap-expected`), "
        "{glue:text}`gap-share:.0%` of the total, within float32 rounding. Training ran {glue:text}`steps` steps.")
    assert not unguarded_verdicts(claimed)
    assert unguarded_verdicts(claimed.replace("ran {glue:text}`steps` steps", "ran {glue:text}`steps` steps, "
                                                                              "more than enough"))


def test_code_math_and_other_roles_are_not_prose():
    text = chapter(
        'glue("n", n)',
        "Here {glue:text}`n` layers use `exact_match` and {ref}`more <sec-more>` with $x < \\text{below}$.\n\n"
        "```{literalinclude} ../x.py\n:caption: the best and worst\n```\n")
    assert not unguarded_verdicts(text)
