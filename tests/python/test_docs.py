"""Every code block of every documentation page is checked, so the pages cannot drift from the code.

Pages: every Markdown file of the repository (``git ls-files``: tracked files, plus new files
that git does not ignore), except the generated benchmark results under
``scripts/bench/results/``. In each page every fenced block (```` ```lang ````) must name its
language, and the language decides the check; a block without a language, or with any other
language, fails. The Python check is one test per page; the others are one test per block, named
``page:line`` (the line of the opening fence), and every message names the page and line.

- ``python``: the page's Python blocks, joined in page order, run as one script in a fresh
  interpreter (this one's ``sys.executable``, so ``import torchmha`` finds the installed
  package) in an empty temporary folder (files the examples write land there), and must exit
  with 0 within 300 s. Each block keeps its page line numbers in the script, so a traceback's
  line number is the page's. Later blocks may use names defined by earlier ones; a block that
  needs something the page does not define fails.
- ``cpp`` and ``cmake``: excerpts of real code. The block is cut into chunks at blank lines and
  at elision lines (a line that is only ``...``, ``// ...`` or ``# ...``); each chunk's lines
  (surrounding whitespace stripped, runs of inner whitespace counted as one space) must appear
  as consecutive lines of one file that the build compiles into a program ctest runs: the
  ``.cpp``, ``.h`` and ``.txt`` (CMakeLists.txt) files under ``tests/`` and
  ``scripts/examples/``. So every C++ or CMake line a page shows is compiled and run.
- ``bash``: commands. For every command (blank lines and ``#`` comments skipped, a trailing
  ``# comment`` dropped, lines ending in ``\\`` joined, each command of a ``&&``/``||``/``;``/``|``
  chain taken separately, leading ``VAR=value`` assignments dropped) the first word must be an
  executable file of the repository (``scripts/test.sh``) or one of the external tools the
  repository's own scripts run, so the commands shown are the ones that are tested: ``cmake``
  (``cmake --install`` in ``tests/cmake_consumer/check.sh``, which ctest runs), ``ctest``
  (``scripts/test.sh``), ``pip`` (``pip install`` / ``pip wheel --no-build-isolation .`` in
  ``scripts/check_packaging.sh``) and ``python`` (``scripts/test.sh``, ``scripts/run.sh``);
  ``.venv/bin/python`` and ``.venv/bin/pip`` (the environment ``scripts/setup.sh`` creates)
  count as ``python`` and ``pip``.
- ``text``: diagrams, trees, schemas, and any other plain text. A block whose first line starts
  with ``torchmha::multi_head_attention(`` must be the op's registered schema
  (``torch.ops.torchmha.multi_head_attention.default._schema``), whitespace aside. In any text
  block, a line that starts with a path (a word with a ``/`` or ending in ``.py``, ``.cpp``,
  ``.h``, ``.cu``, ``.sh``, ``.md``, ``.json`` or ``.txt``) names a file or folder that exists,
  relative to the repository root or to the page's folder (a ``*`` matches as in a glob).
- ``console`` and ``output`` are not allowed: write ``text``.

Besides the blocks, every relative Markdown link (``[x](path)`` and ``[x]: path``) of a page
must point to a file or folder that exists. The last tests check the checks themselves on small
made-up pages, so that a pass above means something.
"""

import glob
import os
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import pytest
import torch

import torchmha  # noqa: F401  (registers the op whose schema the pages show)

REPO = Path(__file__).resolve().parents[2]
EXCLUDED_PAGE_FOLDERS = ("scripts/bench/results/",)
EXCERPT_SOURCE_FOLDERS = ("tests/", "scripts/examples/")
EXCERPT_SOURCE_SUFFIXES = (".cpp", ".h", ".txt")
EXTERNAL_COMMANDS = {"cmake", "ctest", "pip", "python"}
VENV_COMMANDS = {".venv/bin/python", ".venv/bin/pip"}  # what scripts/setup.sh creates
PATH_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".sh", ".md", ".json", ".txt")
SCHEMA_PREFIX = "torchmha::multi_head_attention("
PYTHON_TIMEOUT_S = 300

FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
ELISION = re.compile(r"^(\.\.\.|//\s*\.\.\.|#\s*\.\.\.)$")
PATH_WORD = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.+*/-]*$")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"(`+).*?\1")


class Block(NamedTuple):
    """One fenced block: its page, the line of its opening fence, its language, its lines."""

    page: str
    line: int
    language: str
    lines: List[str]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _listed_files() -> List[str]:
    """Tracked files and new ones git does not ignore; a walk where there is no git checkout."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = {name for name in listing.split("\0") if name}
    except (OSError, subprocess.CalledProcessError):
        skipped = {".git", ".venv"}
        names = set()
        for folder, subfolders, files in os.walk(REPO):
            subfolders[:] = [
                s for s in subfolders if s not in skipped and not s.startswith("build")
            ]
            names.update((Path(folder) / f).relative_to(REPO).as_posix() for f in files)
    # A tracked file deleted in the working tree is no page.
    return sorted(name for name in names if (REPO / name).is_file())


FILES = _listed_files()
PAGES = [
    name for name in FILES if name.endswith(".md") and not name.startswith(EXCLUDED_PAGE_FOLDERS)
]


def parse_blocks(page: str, text: str) -> List[Block]:
    """The fenced blocks of a page (CommonMark fences; content dedented by the fence's indent).

    An unclosed fence is returned with the language ``<unclosed>`` so that it fails.
    """
    blocks = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None or (opening.group(2)[0] == "`" and "`" in opening.group(3)):
            index += 1
            continue
        indent, fence, info = len(opening.group(1)), opening.group(2), opening.group(3).strip()
        language = info.split()[0] if info else ""
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body = []
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            line = lines[end]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            end += 1
        if end == len(lines):
            language = "<unclosed>"
        blocks.append(Block(page, index + 1, language, body))
        index = end + 1
    return blocks


BLOCKS = [
    block
    for page in PAGES
    for block in parse_blocks(page, (REPO / page).read_text(encoding="utf-8"))
]


def _blocks(*languages: str) -> List[Block]:
    return [block for block in BLOCKS if block.language in languages]


def _block_params(blocks: Sequence[Block]) -> List[object]:
    return [
        pytest.param(block, id=f"{block.where}-{block.language or 'untagged'}") for block in blocks
    ]


# ---------------------------------------------------------------------------------------------
# Every block names a supported language.

SUPPORTED = {"python", "cpp", "cmake", "bash", "text"}


def language_problem(block: Block) -> Optional[str]:
    """Why a block's language is not accepted, or None."""
    if block.language == "<unclosed>":
        return f"{block.where}: the fenced block is never closed"
    if not block.language:
        return f"{block.where}: the fenced block names no language"
    if block.language not in SUPPORTED:
        hint = " (write ```text)" if block.language in ("console", "output") else ""
        return f"{block.where}: language `{block.language}` is not checked{hint}"
    return None


@pytest.mark.parametrize("page", PAGES)
def test_every_block_names_a_checked_language(page: str) -> None:
    problems = [language_problem(block) for block in BLOCKS if block.page == page]
    problems = [problem for problem in problems if problem is not None]
    assert not problems, f"supported: {', '.join(sorted(SUPPORTED))}\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# python: each page's blocks run as one script.

PYTHON_PAGES = sorted({block.page for block in _blocks("python")})


def page_script(blocks: Sequence[Block]) -> str:
    """The blocks joined into one script whose line N is the page's line N (blank elsewhere)."""
    script: List[str] = []
    for block in blocks:
        script.extend([""] * (block.line - len(script)))
        script.extend(block.lines)
    return "\n".join(script) + "\n"


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_blocks_run(page: str, tmp_path: Path) -> None:
    blocks = [block for block in _blocks("python") if block.page == page]
    script = tmp_path / (page.replace("/", "__") + ".py")
    script.write_text(page_script(blocks))
    spans = ", ".join(f"{b.line + 1}-{b.line + len(b.lines)}" for b in blocks)
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=PYTHON_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page}: the Python blocks (lines {spans}) ran past {PYTHON_TIMEOUT_S} s")
    if result.returncode != 0:
        pytest.fail(
            f"{page}: the Python blocks (lines {spans}) exited with {result.returncode}; "
            f"line numbers below are the page's\n{result.stdout[-4000:]}{result.stderr[-8000:]}"
        )


# ---------------------------------------------------------------------------------------------
# cpp and cmake: excerpts of sources that ctest builds and runs.


def _normalized(line: str) -> str:
    return " ".join(line.split())


def excerpt_chunks(lines: Sequence[str]) -> List[List[str]]:
    """The block's lines cut at blank and elision lines, normalized; empty chunks dropped."""
    chunks: List[List[str]] = [[]]
    for line in lines:
        normalized = _normalized(line)
        if not normalized or ELISION.match(normalized):
            chunks.append([])
        else:
            chunks[-1].append(normalized)
    return [chunk for chunk in chunks if chunk]


def _excerpt_sources() -> Dict[str, List[str]]:
    return {
        name: [_normalized(line) for line in (REPO / name).read_text(encoding="utf-8").splitlines()]
        for name in FILES
        if name.startswith(EXCERPT_SOURCE_FOLDERS) and name.endswith(EXCERPT_SOURCE_SUFFIXES)
    }


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    width = len(needle)
    return any(
        list(haystack[start : start + width]) == list(needle)
        for start in range(len(haystack) - width + 1)
        if haystack[start] == needle[0]
    )


@pytest.fixture(scope="module")
def excerpt_sources() -> Dict[str, List[str]]:
    return _excerpt_sources()


@pytest.mark.parametrize("block", _block_params(_blocks("cpp", "cmake")))
def test_code_block_is_an_excerpt_of_tested_sources(
    block: Block, excerpt_sources: Dict[str, List[str]]
) -> None:
    chunks = excerpt_chunks(block.lines)
    assert chunks, f"{block.where}: the block is empty"
    missing = [
        chunk
        for chunk in chunks
        if not any(_contains_run(source, chunk) for source in excerpt_sources.values())
    ]
    assert not missing, (
        f"{block.where}: {len(missing)} of {len(chunks)} chunk(s) are not consecutive lines of "
        f"any file under {', '.join(EXCERPT_SOURCE_FOLDERS)} ({', '.join(EXCERPT_SOURCE_SUFFIXES)}"
        "); not found:\n" + "\n---\n".join("\n".join(chunk) for chunk in missing)
    )


# ---------------------------------------------------------------------------------------------
# bash: commands are the repository's scripts or tools its scripts run.

ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"&&", "||", ";", "|", "&", "|&"}


def command_lines(lines: Sequence[str]) -> List[str]:
    """Lines with continuations joined; blank lines and comment lines dropped."""
    joined: List[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.strip()[:-1].strip() + " "
            continue
        joined.append(pending + line.strip())
        pending = ""
    if pending:
        joined.append(pending)
    return [line.strip() for line in joined if line.strip() and not line.strip().startswith("#")]


def first_words(line: str) -> List[str]:
    """The first word of every command of a line, after leading ``VAR=value`` assignments.

    A trailing ``# comment`` is dropped. Raises ValueError on unbalanced quotes.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: List[str] = []
    at_start = True
    for token in lexer:
        if token in OPERATORS:
            at_start = True
        elif at_start and not ASSIGNMENT.match(token):
            words.append(token)
            at_start = False
    return words


def command_problem(word: str) -> Optional[str]:
    """Why ``word`` may not start a documented command, or None."""
    if word in EXTERNAL_COMMANDS or word in VENV_COMMANDS:
        return None
    relative = os.path.normpath(word)
    if relative in FILES:
        if os.access(REPO / relative, os.X_OK):
            return None
        return f"`{word}` is a file of the repository but not executable"
    return (
        f"`{word}` is neither an executable file of the repository nor one of "
        f"{', '.join(sorted(EXTERNAL_COMMANDS))}"
    )


@pytest.mark.parametrize("block", _block_params(_blocks("bash")))
def test_bash_commands_are_tested_scripts_or_tools(block: Block) -> None:
    lines = command_lines(block.lines)
    assert lines, f"{block.where}: the block holds no command"
    problems = []
    for line in lines:
        try:
            words = first_words(line)
        except ValueError as error:
            problems.append(f"{line!r}: {error}")
            continue
        problems.extend(f"{line!r}: {p}" for p in map(command_problem, words) if p is not None)
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# text: the op's schema, and paths at the start of lines.


def normalized_schema(text: str) -> str:
    collapsed = " ".join(text.split())
    return collapsed.replace("( ", "(").replace(" )", ")")


def path_word(line: str) -> Optional[str]:
    """The path a line starts with, or None (trailing ``,``, ``:`` or ``;`` dropped)."""
    words = line.split()
    if not words:
        return None
    word = words[0].rstrip(",:;")
    if not PATH_WORD.match(word):
        return None
    if "/" in word or word.endswith(PATH_SUFFIXES):
        return word
    return None


def path_exists(word: str, page: str) -> bool:
    bases = [REPO, (REPO / page).parent]
    return any(
        glob.glob(str(base / word)) if "*" in word else (base / word).exists() for base in bases
    )


@pytest.mark.parametrize("block", _block_params(_blocks("text")))
def test_text_block_schema_and_paths(block: Block) -> None:
    content = [line for line in block.lines if line.strip()]
    if content and content[0].strip().startswith(SCHEMA_PREFIX):
        registered = str(torch.ops.torchmha.multi_head_attention.default._schema)
        shown = normalized_schema("\n".join(block.lines))
        if shown != normalized_schema(registered):
            pytest.fail(
                f"{block.where}: the schema shown is not the registered one:\n"
                f"shown:      {shown}\nregistered: {normalized_schema(registered)}"
            )
    missing = [
        f"line {block.line + 1 + offset}: {word}"
        for offset, line in enumerate(block.lines)
        for word in [path_word(line.strip())]
        if word is not None and not path_exists(word, block.page)
    ]
    assert not missing, f"{block.where}: paths that do not exist:\n" + "\n".join(missing)


# ---------------------------------------------------------------------------------------------
# Links.


def relative_links(text: str) -> List[tuple]:
    """(line, target) of every relative link outside code blocks and code spans."""
    links = []
    in_fence: Optional[re.Pattern] = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_fence is not None:
            if in_fence.match(line):
                in_fence = None
            continue
        opening = FENCE.match(line)
        if opening is not None:
            fence = opening.group(2)
            in_fence = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            continue
        prose = INLINE_CODE.sub("", line)
        targets = INLINE_LINK.findall(prose)
        reference = REFERENCE_LINK.match(prose)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, mailto:, or an anchor in the same page
            links.append((number, urllib.parse.unquote(target.split("#")[0].split("?")[0])))
    return links


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_exist(page: str) -> None:
    base = (REPO / page).parent
    broken = [
        f"{page}:{line}: {target}"
        for line, target in relative_links((REPO / page).read_text(encoding="utf-8"))
        if not (REPO / target.lstrip("/") if target.startswith("/") else base / target).exists()
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------------------------
# The checks themselves catch what they are meant to catch (so a pass above means something).


def test_checker_finds_untagged_unclosed_and_indented_blocks() -> None:
    page = "intro\n```\nplain\n```\n  ```python\n  x = 1\n  ```\n~~~~cpp\n```\n~~~~\n```bash\nls\n"
    blocks = parse_blocks("page.md", page)
    assert [(b.line, b.language, b.lines) for b in blocks] == [
        (2, "", ["plain"]),
        (5, "python", ["x = 1"]),
        (8, "cpp", ["```"]),
        (11, "<unclosed>", ["ls"]),
    ]
    problems = [language_problem(block) for block in blocks]
    assert problems[1] is None and problems[2] is None
    assert "names no language" in problems[0] and "never closed" in problems[3]
    assert "write ```text" in language_problem(Block("page.md", 1, "console", []))


def test_checker_keeps_page_line_numbers_in_the_script() -> None:
    blocks = parse_blocks("page.md", "a\n```python\nx = 1\n```\nb\n```python\ny = x\n```\n")
    assert page_script(blocks).splitlines() == ["", "", "x = 1", "", "", "", "y = x"]


def test_checker_requires_excerpts_to_be_consecutive_source_lines() -> None:
    source = [_normalized(line) for line in ["int a = 1;", "", "int  b = 2;", "int c = 3;"]]
    chunks = excerpt_chunks(["  int b = 2;", "int c = 3;", "// ...", "int a = 1;"])
    assert chunks == [["int b = 2;", "int c = 3;"], ["int a = 1;"]]
    assert all(_contains_run(source, chunk) for chunk in chunks)
    assert not _contains_run(source, ["int a = 1;", "int b = 2;"])  # a blank line between
    assert not _contains_run(source, ["int c = 3;", "int d = 4;"])


def test_checker_accepts_only_repository_scripts_and_tested_tools() -> None:
    lines = command_lines(["# a comment", "OUT=r scripts/test.sh  # run", "cd build && \\", "  ls"])
    assert lines == ["OUT=r scripts/test.sh  # run", "cd build && ls"]
    assert first_words(lines[0]) == ["scripts/test.sh"]
    assert first_words(lines[1]) == ["cd", "ls"]
    assert first_words("python -c 'a | b; c' | cmake -E cat") == ["python", "cmake"]
    assert command_problem("scripts/test.sh") is None
    assert command_problem("./scripts/test.sh") is None
    assert command_problem("pip") is None
    assert command_problem("cd") is not None
    assert command_problem("README.md") is not None  # in the repository, not executable


def test_checker_compares_schemas_and_finds_missing_paths() -> None:
    registered = str(torch.ops.torchmha.multi_head_attention.default._schema)
    wrapped = registered.replace(", ", ",\n    ").replace("(", "( ", 1)
    assert normalized_schema(wrapped) == normalized_schema(registered)
    assert normalized_schema(registered.replace("bool", "int", 1)) != normalized_schema(registered)
    assert path_word("csrc/ops.cpp, csrc/module.cpp   the op") == "csrc/ops.cpp"
    assert path_word("─ csrc/ops.cpp") is None and path_word("(see csrc/)") is None
    assert path_word("Python ── torchmha.MultiHeadAttention") is None
    assert path_exists("csrc/ops.cpp", "README.md")
    assert path_exists("*.md", "README.md")
    assert not path_exists("csrc/no_such_file.cpp", "README.md")


def test_checker_finds_relative_links_outside_code() -> None:
    page = "[a](x.md) [b](https://e.org) [c](#top) `[d](no.md)` [e](y%20z.md#s)\n[f]: ref.md\n"
    page += "```text\n[g](no.md)\n```\n"
    assert relative_links(page) == [(1, "x.md"), (1, "y z.md"), (2, "ref.md")]
