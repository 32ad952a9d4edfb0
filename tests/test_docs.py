"""The documentation holds together: README.md is a short entrance that opens with the two
commands (the test command being exactly `.ci/run`'s), every relative link in README.md and
docs/*.md leads to a file (and a heading, where it names one), and every `spamray` command line
the documentation shows is one spamray's own parser accepts, so an option that does not exist, or
no longer does, fails here. Fast: no Ray, no subprocess."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest

from spamray.cli import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAIN_JOB = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/spamray demo"
README_MAX_LINES = 150
COMMANDS_WITHIN = 40  # both commands within README's first lines
SHELL_FENCES = {"bash", "sh", "shell", "console", "cron"}
CONTROL = {"&&", "||", ";", "|", "&", "(", ")"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def where(page: Path, line: int) -> str:
    return f"{page.relative_to(ROOT)}:{line}"


def ci_test_command() -> str:
    """The last command line of `.ci/run`: the test command the README must show."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][-1]


def split_fences(page: Path) -> tuple[list[tuple[int, str]], list[tuple[str, list[tuple[int, str]]]]]:
    """The lines outside fenced code blocks, as (line number, text), and the blocks, as
    (info string, [(line number, text)])."""
    prose, blocks, fence, info, body = [], [], None, "", []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        marker = re.match(r"\s*(`{3,}|~{3,})\s*([^\s`]*)", line)
        if marker and fence is None:
            fence, info, body = marker.group(1), marker.group(2).lower(), []
        elif marker and fence is not None and marker.group(1).startswith(fence) and not marker.group(2):
            blocks.append((info, body))
            fence = None
        elif fence is not None:
            body.append((number, line))
        else:
            prose.append((number, line))
    return prose, blocks


def prose_lines(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, inline code removed."""
    return [(number, re.sub(r"`[^`]*`", "", line)) for number, line in split_fences(page)[0]]


def fenced_blocks(page: Path) -> list[tuple[str, list[tuple[int, str]]]]:
    return split_fences(page)[1]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in split_fences(page)[0] if page.suffix == ".md" else []:
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def without_comment(line: str) -> str:
    """The line up to a shell comment: a `#` outside quotes at the start of a word."""
    quote, escaped = None, False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def shell_lines(info: str, body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The command lines of a shell block: continuations joined, prompts and cron times removed."""
    lines, pending, first = [], "", None
    for number, text in body:
        if info == "console":
            if pending:
                text = text.lstrip()
            elif text.lstrip().startswith("$ "):
                text = text.lstrip()[2:]
            else:
                continue  # output
        if first is None:
            first = number
        code = without_comment(text).rstrip()
        if code.endswith("\\"):
            pending += code[:-1] + " "
            continue
        line = pending + text
        pending, start, first = "", first, None
        if info == "cron":
            fields = line.split(None, 5)
            if len(fields) < 6 or fields[0].startswith("#"):
                continue
            line = fields[5]
        lines.append((start, line))
    return lines


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on a shell line, without its redirections."""
    lexer = shlex.shlex(without_comment(line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    commands, words, skip = [], [], False
    for token in lexer:
        if skip:
            skip = False
        elif token in CONTROL:
            commands.append(words)
            words = []
        elif token and set(token) <= set("<>&|") and re.search("[<>]", token):
            if words and words[-1].isdigit():
                words.pop()  # a file descriptor: 2>&1
            skip = True  # the redirection's target
        else:
            words.append(token)
    commands.append(words)
    return [command for command in commands if command]


def spamray_argv(words: list[str]) -> list[str] | None:
    """The arguments a command passes to spamray's parser, or None when it does not run spamray:
    `spamray VERB …` (any path to it, after environment assignments), `python jobs/VERB.py …`
    (the job scripts take the verb's options), and either after `ray job submit … --`."""
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    program = PurePosixPath(words[0]).name
    if program == "spamray":
        return words[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program) and len(words) > 1:
        job = re.fullmatch(r"(?:\./)?jobs/(\w+)\.py", words[1])
        if job:
            assert (ROOT / "jobs" / f"{job.group(1)}.py").is_file(), f"no such job script: {words[1]}"
            return [job.group(1), *words[2:]]
        return None
    if program == "ray" and words[1:3] == ["job", "submit"] and "--" in words:
        return spamray_argv(words[words.index("--") + 1:])
    return None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file:line, the shell line, spamray's arguments) of every spamray command line shown."""
    found = []
    for page in PAGES:
        for info, body in fenced_blocks(page):
            if info not in SHELL_FENCES:
                continue
            for number, line in shell_lines(info, body):
                for words in simple_commands(line):
                    argv = spamray_argv(words)
                    if argv is not None:
                        found.append((where(page, number), line.strip(), argv))
    return found


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md: {len(lines)} lines, more than {README_MAX_LINES}; move reference text to docs/")
    head = [line.strip() for line in lines[:COMMANDS_WITHIN]]
    for name, command in (("main job", MAIN_JOB), ("test (.ci/run's last line)", ci_test_command())):
        assert command in head, (
            f"README.md:1-{COMMANDS_WITHIN}: the {name} command is not a line of the first {COMMANDS_WITHIN} "
            f"lines: {command}")


def test_every_relative_link_leads_to_a_file_and_heading():
    broken, checked = [], 0
    for page in PAGES:
        for number, line in prose_lines(page):
            for target in LINK.findall(line):
                if SCHEME.match(target) or target.startswith("//"):
                    continue
                path, _, anchor = target.partition("#")
                file = (page.parent / path).resolve() if path else page
                checked += 1
                if not file.exists():
                    broken.append(f"{where(page, number)}: {target}: no such file {file}")
                elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                    broken.append(f"{where(page, number)}: {target}: no heading #{anchor} in "
                                  f"{file.relative_to(ROOT)}")
    assert checked, "no relative links found in README.md and docs/*.md"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_documented_spamray_command_parses():
    commands = documented_commands()
    assert commands, "no spamray command lines found in the shell blocks of README.md and docs/*.md"
    parser, refused = build_parser(), []
    for place, line, argv in commands:
        if {"-h", "--help"} & set(argv):
            if not argv or argv[0] not in VERBS:
                refused.append(f"{place}: {line}\n    unknown verb: {argv[:1]}")
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(argv)
        except SystemExit:
            message = errors.getvalue().strip().splitlines()
            refused.append(f"{place}: {line}\n    {message[-1] if message else 'refused'}")
    assert not refused, "documented commands spamray's parser refuses:\n" + "\n".join(refused)


def test_the_documented_commands_cover_every_verb():
    verbs = {argv[0] for _, _, argv in documented_commands() if argv}
    assert verbs >= set(VERBS), f"README.md and docs/*.md show no command line for: {sorted(set(VERBS) - verbs)}"


@pytest.mark.parametrize("line, argv", [
    ("spamray score --model m --input 'a b/*.parquet' --output o  # a comment", ["score", "--model", "m", "--input",
                                                                                "a b/*.parquet", "--output", "o"]),
    ("cd /x && RAY_ADDRESS=http://h:8265 ray job submit --working-dir . -- python jobs/score.py --model m >> l 2>&1",
     ["score", "--model", "m"]),
    (".venv/bin/spamray demo", ["demo"]),
    ("ray job logs JOB_ID --follow", None),
])
def test_the_command_finder_reads_shell_lines(line, argv):
    found = [spamray_argv(words) for words in simple_commands(line)]
    assert [a for a in found if a is not None] == ([argv] if argv else [])
