"""README.md stays a short story whose commands run: at most 3,000 words, every `python <script>.py config.yaml
...` line in its bash blocks dry-run checked (the script exists, the overrides load, the --flags exist), and every
docs page it links there. Nothing here trains or loads a model: `--help` is the only process started."""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

import config as C
from conftest import seconds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_WORDS = 3000
OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_0-9]+=")  # section.key=value
PLACEHOLDER = re.compile(r"<[^>]*>|\$\{?[A-Za-z_]")  # <output_dir>, $VAR, ${VAR}: not a literal command
SEPARATORS = {"|", "||", "&", "&&", ";"}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def bash_lines(text):
    """(line number, command) for each logical line of the ```bash blocks: continuations joined."""
    lines, block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, pending + line))
        pending = ""
    return lines


def python_commands(line):
    """The `python <script>.py config.yaml ...` commands in one shell line: lists of words, comments
    dropped, split at pipes and `&&`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, words = [], []
    for word in [*lexer, ";"]:
        if word in SEPARATORS:
            if len(words) >= 3 and words[0] == "python" and words[1].endswith(".py") and words[2] == "config.yaml":
                commands.append(words)
            words = []
        else:
            words.append(word)
    return commands


def readme_commands():
    params = []
    for number, line in bash_lines(read(README)):
        if "python" not in line:
            continue
        skip = PLACEHOLDER.search(line)
        reason = f"placeholder {skip.group(0)!r}" if skip else None
        try:
            commands = python_commands(line) if not skip else [line.split()]
        except ValueError as e:  # not one shell line (a quote closed on a later line): shown, not checked
            commands, reason = [line.split()], f"not one shell line ({e})"
        for words in commands:
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(words, id=f"README.md:{number}", marks=marks))
    return params


COMMANDS = readme_commands()


def test_readme_is_short():
    words = len(read(README).split())  # what `wc -w README.md` counts
    assert words <= MAX_WORDS, f"README.md has {words} words; move detail to docs/ (at most {MAX_WORDS})"


def test_readme_shows_the_entry_scripts():
    """The parser above finds the README's commands (else the dry run below would check nothing)."""
    scripts = {words[1] for p in COMMANDS for words in p.values}
    assert {"train.py", "federated.py", "infer.py", "merge.py"} <= scripts, scripts


@functools.cache
def help_text(script):
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=seconds(60)
    )
    if done.returncode != 0 and "No module named" in done.stderr:  # an optional package (flwr, gguf, ...)
        pytest.skip(f"{script} --help: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("words", COMMANDS)
def test_readme_command_dry_run(words):
    script, args = words[1], words[3:]
    assert os.path.isfile(os.path.join(ROOT, script)), f"{script}: no such script"
    overrides = [a for a in args if OVERRIDE.match(a)]
    C.load_config(os.path.join(ROOT, "config.yaml"), overrides)  # raises ConfigError naming a bad key or value
    flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if flags:
        usage = help_text(script)
        missing = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage))
        assert not missing, f"{script} has no {', '.join(missing)} (see python {script} --help)"


def slug(heading):
    """GitHub's anchor for a heading: lowercased, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in read(path).splitlines() if re.match(r"#{1,6} ", line)}


def local_links(path):
    """(target file, anchor) of every relative Markdown link in a file."""
    links = re.findall(r"\]\(([^)\s]+)\)", read(path))
    return [link.partition("#")[::2] for link in links if not re.match(r"[a-z]+:", link)]


DOC_PAGES = sorted(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


@pytest.mark.parametrize("page", ["README.md", *DOC_PAGES])
def test_linked_docs_exist(page):
    path = os.path.join(ROOT, page)
    broken = []
    for target, anchor in local_links(path):
        full = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        if not os.path.exists(full):
            broken.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            broken.append(f"{target}#{anchor}: no such heading")
    assert not broken, f"{page}: " + "; ".join(broken)
    if page == "README.md":
        assert any(t.startswith("docs/") and t.endswith(".md") for t, _ in local_links(path))


def test_the_reading_order_gives_each_module_its_line_count():
    """The README's module map: every row's line count is the file's (wc -l), and every .py at the top level
    is listed."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", text, re.M))
    for name, count in rows.items():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            assert int(count) == sum(1 for _ in f), f"README's reading order: {name} has {count} lines listed"
    modules = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert modules <= set(rows), f"missing from the reading order: {sorted(modules - set(rows))}"


def test_no_entry_script_imports_another():
    """Library modules below, entry scripts on top: what two scripts share lives in a library module."""
    scripts = ("train", "federated", "flower_app", "infer", "merge", "bench")
    for name in [*scripts, *(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py") and f[:-3] not in scripts)]:
        source = open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read()
        imported = set(re.findall(r"^\s*import (\w+)", source, re.M))
        assert not imported & set(scripts) - {name}, f"{name}.py imports {sorted(imported & set(scripts))}"
