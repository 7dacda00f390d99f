"""The documentation tells the truth about the repository.

Checked on README.md, projects/**/*.md and docs/*.md:

- every relative link and image resolves to a file or folder of the repository; a link with an
  anchor (``page.md#section``, ``#section``) must name a heading of the target page (GitHub's
  heading ids: lower case, punctuation dropped, spaces as ``-``, ``-1``, ``-2`` for repeats);
- every ``tools/...`` script named anywhere exists, and every command in a fenced code block that
  runs a ``tools/*.py`` script uses only flags that the script's argument parser defines (joined
  over backslash continuations, comments dropped; ``key=value`` config overrides are not flags);
- every ``configs/*.py`` named exists, except a config file that a code block of the same page
  writes itself (a block whose first line is ``# configs/NAME.py``).

The flags are read from each script's source with ``ast`` (its ``add_argument("--...")`` calls;
for scripts built on Detectron2's ``default_argument_parser``, that function's calls in the
installed detectron2's source), so no tool is imported or run. A script with subcommands
(``tools/visualize.py``) accepts the flags of all its subcommands together.
"""
import ast
import functools
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted({ROOT / "README.md", *ROOT.glob("projects/**/*.md"), *ROOT.glob("docs/*.md")})

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TOOL = re.compile(r"(?<![\w./-])(?:\./)?tools/[\w-]+\.(?:py|sh)\b")
CONFIG = re.compile(r"(?<![\w.-])configs/[\w/-]+\.py\b")
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


def _split_fences(text: str):
    """(prose lines, [(language, block lines)]) of a Markdown text."""
    prose, blocks, block, lang = [], [], None, ""
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if block is None and match:
            block, lang = [], match.group(1)
        elif block is not None and line.strip() == "```":
            blocks.append((lang, block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's id of a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@functools.lru_cache(maxsize=None)
def _anchors(page: Path) -> frozenset:
    prose, _ = _split_fences(page.read_text(encoding="utf-8"))
    seen, anchors = {}, set()
    for line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(anchors)


def link_problems(page: Path, text: str):
    """Relative links and images of ``text`` (a page's prose) that do not resolve."""
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            problems.append(f"{page.relative_to(ROOT)}: link {target}: {path} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{page.relative_to(ROOT)}: link {target}: no heading #{anchor} in "
                            f"{resolved.relative_to(ROOT)}")
    return problems


def _argparse_flags(source: str, function: str = None) -> set:
    """The option strings of every ``add_argument`` call in ``source`` (or in one function of it)."""
    tree = ast.parse(source)
    if function is not None:
        tree = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == function)
    flags = {"-h", "--help"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags.update(arg.value for arg in node.args
                         if isinstance(arg, ast.Constant) and str(arg.value).startswith("-"))
    return flags


@functools.lru_cache(maxsize=None)
def _detectron2_default_flags() -> frozenset:
    spec = importlib.util.find_spec("detectron2")  # finds the package without importing it
    defaults = Path(spec.origin).parent / "engine" / "defaults.py"
    return frozenset(_argparse_flags(defaults.read_text(encoding="utf-8"), "default_argument_parser"))


@functools.lru_cache(maxsize=None)
def tool_flags(script: Path) -> frozenset:
    """Every flag the script's command line accepts."""
    source = script.read_text(encoding="utf-8")
    flags = _argparse_flags(source)
    if re.search(r"\bdefault_argument_parser\s*\(", source):
        flags |= _detectron2_default_flags()
    return frozenset(flags)


def _commands(block_lines):
    """The shell commands of a code block: continuations joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``; each a list of words."""
    joined, current = [], ""
    for line in block_lines:
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current)
        current = ""
    joined.append(current)
    commands = []
    for line in joined:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not shell (an unbalanced quote in a code sample)
            continue
        command = []
        for word in words:
            if word in SHELL_SEPARATORS:
                commands.append(command)
                command = []
            else:
                command.append(word)
        commands.append(command)
    return [command for command in commands if command]


def command_problems(block_lines, where: str):
    """Commands of a code block that run a missing tool or give it a flag its parser lacks."""
    problems = []
    for words in _commands(block_lines):
        script_index = next((i for i, word in enumerate(words) if TOOL.fullmatch(word)), None)
        if script_index is None:
            continue
        script = ROOT / words[script_index].removeprefix("./")
        if not script.is_file():
            problems.append(f"{where}: {words[script_index]} does not exist")
            continue
        if script.suffix != ".py":
            continue
        accepted = tool_flags(script)
        for word in words[script_index + 1:]:
            flag = word.strip("[]").split("=", 1)[0]
            if flag.startswith("-") and not re.fullmatch(r"-\d[\d.]*", flag) and flag not in accepted:
                problems.append(f"{where}: {script.relative_to(ROOT)} has no flag {flag} "
                                f"(in: {' '.join(words)})")
    return problems


def path_problems(page: Path, text: str, blocks):
    """Scripts and configs named on the page that do not exist."""
    written_here = {lines[0].lstrip("# ").strip() for _, lines in blocks
                    if lines and re.fullmatch(r"#\s*configs/[\w/-]+\.py", lines[0].strip())}
    problems = []
    for name in sorted(set(TOOL.findall(text))):
        if not (ROOT / name.removeprefix("./")).is_file():
            problems.append(f"{page.relative_to(ROOT)}: {name} does not exist")
    for name in sorted(set(CONFIG.findall(text)) - written_here):
        if not (ROOT / name).is_file():
            problems.append(f"{page.relative_to(ROOT)}: {name} does not exist")
    return problems


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_are_found():
    names = {_page_id(page) for page in PAGES}
    assert {"README.md", "projects/DABDETR/README.md"} <= names
    assert any(name.startswith("docs/") for name in names)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_links_and_images_resolve(page):
    prose, _ = _split_fences(page.read_text(encoding="utf-8"))
    problems = link_problems(page, "\n".join(prose))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_scripts_and_configs_exist(page):
    text = page.read_text(encoding="utf-8")
    _, blocks = _split_fences(text)
    problems = path_problems(page, text, blocks)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_tool_commands_use_only_flags_the_tools_accept(page):
    _, blocks = _split_fences(page.read_text(encoding="utf-8"))
    problems = []
    for number, (_, lines) in enumerate(blocks, 1):
        problems += command_problems(lines, f"{_page_id(page)}, code block {number}")
    assert not problems, "\n".join(problems)


def test_the_checker_reads_continuations_overrides_and_launchers():
    block = [
        "# a comment with --not-a-flag",
        "torchrun --nproc-per-node 2 tools/lazyconfig_train_net.py --config-file configs/dab_detr_r50.py \\",
        "    --resume train.max_iter=10 model.num_classes=3  # trailing comment --neither",
        "python tools/predict.py --config-file configs/dab_detr_demo.py --inputs a.jpg --layer -1",
        "python tools/convert_checkpoint.py --source=hf a b && python tools/missing_tool.py --x",
    ]
    problems = command_problems(block, "sample")
    assert len(problems) == 3, problems
    assert "tools/predict.py has no flag --inputs" in problems[0]
    assert "--layer" in problems[1]  # predict.py has no --layer; -1 is a value, not a flag
    assert "tools/missing_tool.py does not exist" in problems[2]


def test_the_checker_finds_broken_links_anchors_and_configs(tmp_path):
    page = ROOT / "README.md"
    text = "[a](docs/NOPE.md) [b](#no-such-heading) [c](docs/) ![d](https://example.com/x.png)"
    problems = link_problems(page, text)
    assert len(problems) == 2 and "docs/NOPE.md does not exist" in problems[0], problems
    blocks = [("python", ["# configs/my_data.py", "from .dab_detr_r50 import model"])]
    assert path_problems(page, "configs/my_data.py and configs/nope.py", blocks) == [
        "README.md: configs/nope.py does not exist"]
