"""gdb's conventions: `help` and TAB completion from the same argparse parsers
that parse the commands, klp-watch's subcommands, styled PROBLEM and
violation lines only where gdb styles, $klp_addr's errors in one line."""

import argparse
import os
import pty
import re
import subprocess

import pytest

from gdbklp.gdbext.commands import style
from gdbklp.options import add_start_arguments
from helpers import GDB, REPO, run_gdb_batch

in_gdb = pytest.mark.gdb  # gdb-multiarch (no guest); the styling helper's own tests need none

SUBCOMMANDS = ("start", "stop", "status", "report", "finish")


def assert_no_traceback(proc):
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "Python Exception" not in text and "Error occurred in Python" \
            not in text, text


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def options_listed(help_text: str) -> set[str]:
    """The options a help text's option list shows, each first on its line."""
    section = help_text.split("options:", 1)[1]
    return {s for m in re.finditer(r"^ {2}(-[-\w]+)(?:, (-[-\w]+))?", section, re.M) for s in m.groups() if s}


def start_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klp-watch start")
    add_start_arguments(parser)
    return parser


@in_gdb
def test_help_lists_the_subcommands():
    proc = run_gdb_batch("help klp-watch")
    assert_no_traceback(proc)
    assert "Watch live-patch redirections per task" in proc.stdout
    assert "usage: klp-watch" in proc.stdout
    listed = re.findall(r"^klp-watch (\w+) -- ", proc.stdout, re.M)
    assert sorted(listed) == sorted(SUBCOMMANDS)


@in_gdb
def test_help_of_start_shows_every_option_of_the_parser():
    proc = run_gdb_batch("help klp-watch start")
    assert_no_traceback(proc)
    text = proc.stdout
    assert text.startswith("Insert the probes; the guest keeps running.\n")
    assert "usage: klp-watch start" in text
    assert options_listed(text) == option_strings(start_parser())
    for action in start_parser()._actions:
        if action.help and action.help != argparse.SUPPRESS:
            first_words = " ".join(action.help.split()[:3])
            assert first_words in " ".join(text.split()), action.option_strings


@in_gdb
@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_each_subcommand_is_its_own(sub):
    proc = run_gdb_batch(f"help klp-watch {sub}")
    assert_no_traceback(proc)
    assert f"usage: klp-watch {sub} [-h]" in proc.stdout
    assert ("--json" in proc.stdout) == (sub in ("status", "report"))  # print as JSON
    assert ("--report FILE" in proc.stdout) == (sub in ("start", "report", "finish"))  # write JSON


@in_gdb
def test_help_of_klp_frames_shows_every_option():
    proc = run_gdb_batch("help klp-frames")
    assert_no_traceback(proc)
    first = proc.stdout.splitlines()[0]
    assert first.startswith("Decode kernel stacks through live-patch trampolines") and first.endswith("inconsistent.")
    assert "usage: klp-frames" in proc.stdout
    assert options_listed(proc.stdout) == {"-h", "--help", "--all", "--task", "--all-tasks", "--json"}


@in_gdb
@pytest.mark.parametrize("command,options", [("klp-lint", {"--rfc", "--json"}), ("klp-transition", {"--json"}),
                                             ("klp-unwinder", set())])
def test_help_of_the_other_commands_shows_their_usage(command, options):
    proc = run_gdb_batch(f"help {command}")
    assert_no_traceback(proc)
    assert f"usage: {command} [-h]" in proc.stdout
    assert options_listed(proc.stdout) == {"-h", "--help"} | options


@in_gdb
def test_help_of_klp_addr_shows_its_usage():
    proc = run_gdb_batch("help function klp_addr")
    assert 'Usage: $klp_addr("NAME")' in proc.stdout


def completions(*lines: str) -> list[list[str]]:
    marker = "==="
    commands = [c for line in lines for c in (f"complete {line}", f"echo {marker}\\n")]
    proc = run_gdb_batch(*commands)
    assert_no_traceback(proc)
    return [block.strip().splitlines() for block in proc.stdout.split(marker + "\n")[:-1]]


@in_gdb
def test_options_complete_with_tab():
    got = completions("klp-watch start --re", "klp-watch st", "klp-frames --al", "klp-watch start --design ",
                      "klp-unwinder o", "klp-watch status --", "klp-watch start --max-events 3 --fail")
    assert got == [
        ["klp-watch start --record", "klp-watch start --report", "klp-watch start --resolve-indirect"],
        ["klp-watch start", "klp-watch status", "klp-watch stop"],
        ["klp-frames --all", "klp-frames --all-tasks"],
        ["klp-watch start --design auto", "klp-watch start --design livepatch-stack", "klp-watch start --design rfc"],
        ["klp-unwinder off", "klp-unwinder on"],
        ["klp-watch status --help", "klp-watch status --json"],
        ["klp-watch start --max-events 3 --fail-fast"],
    ]


@in_gdb
def test_a_file_option_completes_file_names():
    got = completions(f"klp-watch report --report {REPO}/pyproject.to", f"klp-watch start --report {REPO}/gdbinit.")
    assert got == [[f"klp-watch report --report {REPO}/pyproject.toml"], [f"klp-watch start --report {REPO}/gdbinit.d/"]]


@in_gdb
def test_subcommands_parse_as_before():
    proc = run_gdb_batch("klp-watch start --bogus", "klp-watch start --max-events x", "klp-watch status --help")
    assert_no_traceback(proc)
    assert proc.stderr.strip().splitlines() == [
        "klp-watch: unrecognized arguments: --bogus",
        "klp-watch start: argument --max-events: invalid int value: 'x'"]
    assert proc.stdout.startswith("usage: klp-watch status [-h] [--json]")


@in_gdb
@pytest.mark.parametrize("call,line", [
    ('$klp_addr("foo")', "$klp_addr: no vmlinux loaded: use 'file vmlinux' first"),
    ("$klp_addr(1)", '$klp_addr: the argument must be a string: $klp_addr("name"), not a value of type int'),
    ("$klp_addr()", "$klp_addr: takes one argument, a function's name: $klp_addr(\"name\"), not 0"),
    ('$klp_addr("a", "b")', "$klp_addr: takes one argument, a function's name: $klp_addr(\"name\"), not 2"),
])
def test_klp_addr_errors_are_one_plain_line(call, line):
    proc = run_gdb_batch(f"print {call}")
    assert_no_traceback(proc)
    assert proc.stderr.strip() == line


# ---- styling ------------------------------------------------------------------

FRAMES = "cpu0: task 0x1\n  #0  sp 0x2  f  current\n  end: x\n  PROBLEM: the entry's magic is 0x0\n  PROBLEM: two"
VIOLATION = "VIOLATION of invariant 4: r2\n  redirection #3: task 0x1\n  expected: a\n  found:    b"


def test_styling_off_leaves_the_text_as_it_is():
    assert style.emphasize(FRAMES, None) == FRAMES
    assert style.emphasize(VIOLATION, "") == VIOLATION


def test_styling_marks_problem_and_violation_lines_only():
    start = style.sgr("red", "none", "bold")
    assert start == "\033[1;31m"
    lines = style.emphasize(FRAMES, start).split("\n")
    assert lines[:3] == FRAMES.split("\n")[:3]
    assert lines[3:] == [f"{start}  PROBLEM: the entry's magic is 0x0\033[m", f"{start}  PROBLEM: two\033[m"]
    block = style.emphasize(VIOLATION, start).split("\n")
    assert block[0] == f"{start}VIOLATION of invariant 4: r2\033[m" and block[1:] == VIOLATION.split("\n")[1:]
    quiet = "klp-watch: invariant 4 violated: r2 (redirection #3)"
    assert style.emphasize(quiet, start) == f"{start}{quiet}\033[m"
    summary = "klp-watch (livepatch-stack): 9 redirections, 1 violations (running)\n  invariants violated: 4 (x)"
    assert style.emphasize(summary, start).split("\n") == [summary.split("\n")[0],
                                                          f"{start}  invariants violated: 4 (x)\033[m"]


@pytest.mark.parametrize("style_args,escape", [
    (("red", "none", "normal"), "\033[31m"), (("none", "none", "normal"), ""),
    (("yellow", "blue", "dim"), "\033[2;33;44m"), (("#ff0000", "none", "bold"), "\033[1m")])
def test_sgr_follows_gdbs_style_names(style_args, escape):
    assert style.sgr(*style_args) == escape


def gdb_on_a_terminal(*commands: str) -> str:
    """gdb -batch with its output on a pseudo-terminal: what it wrote."""
    cmd = [GDB, "-nx", "-batch", "-x", str(REPO / "gdbinit.d" / "gdbklp.py")]
    for c in commands:
        cmd += ["-ex", c]
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TERM": "xterm"})
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: gdb closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    proc.wait(timeout=60)
    return out.decode(errors="replace")


@in_gdb
def test_styled_only_where_gdb_styles():
    show = "python from gdbklp.gdbext.commands.style import styled; gdb.write(styled('  PROBLEM: x') + '\\n')"
    out = gdb_on_a_terminal(show, "set style enabled on", show, "set style highlight foreground green", show,
                            "set style enabled off", show)
    lines = [line for line in out.replace("\r", "").splitlines() if "PROBLEM" in line]
    assert lines == ["  PROBLEM: x",  # -batch: gdb's styling is off
                     "\033[31m  PROBLEM: x\033[m", "\033[32m  PROBLEM: x\033[m",
                     "  PROBLEM: x"]
    piped = run_gdb_batch("set style enabled on", show)  # not a terminal: plain
    assert piped.stdout.splitlines() == ["  PROBLEM: x"]
