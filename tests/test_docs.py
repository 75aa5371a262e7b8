"""The documentation against the code: the invariant catalogue, the README's
cheat sheets, its length, the demo table's header, and no path outside the
repository. Unit tests: nothing is built, booted or run in gdb."""

import argparse
import ast
import re
from pathlib import Path

import pytest

from gdbklp import options
from gdbklp.lab import mutants, workload

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CATALOGUE = ROOT / "docs" / "invariants.md"


# ---- the invariant numbers the code can report -----------------------------

def _int_values(node: ast.AST, tree: ast.AST) -> set[int]:
    """The integers an argument can be: a literal, a conditional of literals,
    or a local name assigned from those."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _int_values(node.body, tree) | _int_values(node.orelse, tree)
    if isinstance(node, ast.Name):
        found = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in n.targets):
                found |= _int_values(n.value, tree)
        if found:
            return found
    raise AssertionError(f"cannot tell the invariant number of {ast.unparse(node)}")


def reported_invariants(root: Path = ROOT / "gdbklp") -> dict[int, list[str]]:
    """Every invariant number in a Violation(...) call, in text that says
    "invariant N" to the user, and in the mutants' declarations."""
    found: dict[int, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Violation" and node.args:
                for n in _int_values(node.args[0], tree):
                    found.setdefault(n, []).append(f"{path.relative_to(root)}:{node.lineno}")
            # messages printed to the user that name an invariant (klp-transition's VIOLATION line, ...)
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in re.finditer(r"(?:VIOLATION of invariant|design hazard \(invariant) (\d+)", node.value):
                    found.setdefault(int(m.group(1)), []).append(f"{path.relative_to(root)}:{node.lineno}")
    if root == ROOT / "gdbklp":
        for m in _mutants():
            found.setdefault(m.invariant, []).append(f"mutant {m.name}")
    return found


def _mutants():
    return list(mutants.MUTANTS.values()) if isinstance(mutants.MUTANTS, dict) else list(mutants.MUTANTS)


def catalogue_entries(text: str) -> set[int]:
    return {int(n) for n in re.findall(r'^<a id="(\d+)"></a>\n## \1\. ', text, flags=re.M)}


def test_the_code_reports_the_known_numbers():
    # a check of the collector itself: these are in the code today
    assert {2, 3, 7, 8, 9, 10, 12, 14} <= set(reported_invariants())


def test_every_reported_invariant_has_a_catalogue_entry_and_no_other():
    reported = reported_invariants()
    entries = catalogue_entries(CATALOGUE.read_text())
    missing = {n: reported[n] for n in set(reported) - entries}
    assert not missing, f"invariants the code reports with no entry in docs/invariants.md: {missing}"
    assert entries == set(reported), f"entries for numbers the code never reports: {entries - set(reported)}"


def test_each_catalogue_entry_names_where_it_is_checked_and_its_mutants():
    text = CATALOGUE.read_text()
    for n in catalogue_entries(text):
        entry = text.split(f'<a id="{n}"></a>', 1)[1].split("<a id=", 1)[0]
        assert "**Checked**" in entry and "**Proven by**" in entry, f"entry {n}"
        for m in _mutants():
            if m.invariant == n:
                assert f"`{m.name}`" in entry, f"entry {n} does not name its mutant {m.name}"


def test_collector_fails_on_an_uncatalogued_number(tmp_path):
    (tmp_path / "x.py").write_text("Violation(99, 'x', 'y', 'z')\ninv = 4 if a else 98\nViolation(inv, 't', 'e', 'f')\n")
    # same collector on a tree with new numbers: they are found, and the catalogue lacks them
    found = set(reported_invariants(tmp_path))
    assert {99, 98, 4} <= found
    assert not {99, 98} <= catalogue_entries(CATALOGUE.read_text())


# ---- the README's cheat sheets against the real parsers --------------------

class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def cli_parser(monkeypatch) -> argparse.ArgumentParser:
    """gdbklp's parser, as gdbklp.cli.main builds it (caught before it parses)."""
    from gdbklp import cli

    def capture(self, *args, **kwargs):
        raise _Parsed(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        cli.main([])
    monkeypatch.undo()
    return caught.value.parser


def gdb_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each gdb command's parser, from its configure() method run on a real
    ArgumentParser (the command modules import gdb, so their source is read,
    not imported)."""
    parsers = {}
    for path in sorted((ROOT / "gdbklp" / "gdbext" / "commands").glob("*.py")):
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            name = next((s.value.value for s in cls.body if isinstance(s, ast.Assign)
                         and any(getattr(t, "id", None) == "name" for t in s.targets)), None)
            configure = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "configure"), None)
            if not name or configure is None:
                continue
            namespace = {"argparse": argparse, "add_start_arguments": options.add_start_arguments}
            exec(compile(ast.Module([configure], type_ignores=[]), str(path), "exec"), namespace)
            parser = argparse.ArgumentParser(prog=name)
            namespace["configure"](None, parser)
            parsers[name] = parser
    return parsers


def _subparsers(parser):
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _positional_choices(parser):
    return {c for a in parser._actions if not a.option_strings and a.choices and
            not isinstance(a, argparse._SubParsersAction) for c in a.choices}


def check_line(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """What in one cheat-sheet line the parser does not have: options,
    subcommands, choices. Upper-case words and words with other characters are
    placeholders."""
    problems = []
    current = [parser]
    last_option = None
    for word in words:
        if word == "--":
            break
        alternatives = [w for w in re.split(r"\|", word.strip("[]()")) if w]
        if not alternatives:
            continue
        if alternatives[0].startswith("-"):
            for opt in alternatives:
                owners = [p for p in current if opt in p._option_string_actions]
                if not owners:
                    problems.append(f"{' / '.join(p.prog for p in current)}: no option {opt}")
                else:
                    last_option = owners[0]._option_string_actions[opt]
            continue
        if not all(re.fullmatch(r"[a-z0-9.][a-z0-9.-]*", w) for w in alternatives):
            last_option = None
            continue  # a placeholder (FILE, N, PATH.ko) or an example value
        subs = {name: sub for p in current for name, sub in _subparsers(p).items()}
        if subs:
            missing = [w for w in alternatives if w not in subs]
            problems += [f"{current[0].prog}: no subcommand {w}" for w in missing]
            current = [subs[w] for w in alternatives if w in subs] or current
        elif last_option is not None and last_option.choices:
            problems += [f"{last_option.dest}: no choice {w}" for w in alternatives if w not in last_option.choices]
        elif _positional_choices(current[0]):
            problems += [f"{current[0].prog}: no choice {w}" for w in alternatives
                         if w not in _positional_choices(current[0])]
        last_option = None
    return problems


def cheat_sheet(heading: str) -> list[list[str]]:
    """The lines of the code block under a README heading, each as words
    (comments cut off; a line starting with spaces continues the last one)."""
    text = README.read_text()
    section = text.split(f"### {heading}\n", 1)[1]
    block = section.split("```\n", 2)[1]
    lines: list[list[str]] = []
    for line in block.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if line.startswith(" ") and lines:
            lines[-1] += words
        else:
            lines.append(words)
    return lines


def test_readme_gdb_commands_exist_in_their_parsers():
    parsers = gdb_parsers()
    assert {"klp-watch", "klp-frames", "klp-transition", "klp-lint", "klp-unwinder"} <= set(parsers)
    problems, seen = [], set()
    for words in cheat_sheet("gdb commands"):
        if words[0] == "break":
            assert "$klp_addr(" in " ".join(words)
            continue
        assert words[0] in parsers, f"no gdb command {words[0]}"
        seen.add(words[0])
        problems += check_line(parsers[words[0]], words[1:])
    assert not problems, problems
    assert seen == set(parsers), f"commands missing from the cheat sheet: {set(parsers) - seen}"


def test_readme_command_line_exists_in_the_parser(monkeypatch):
    parser = cli_parser(monkeypatch)
    problems = []
    for words in cheat_sheet("Command line"):
        assert words[0] == "gdbklp", words
        problems += check_line(parser, words[1:])
    assert not problems, problems


def test_cheat_sheet_check_can_fail(monkeypatch):
    parsers = gdb_parsers()
    assert check_line(parsers["klp-watch"], ["start", "[--no-such-option]"])
    assert check_line(parsers["klp-watch"], ["begin"])
    assert check_line(parsers["klp-unwinder"], ["on|maybe"])
    parser = cli_parser(monkeypatch)
    assert check_line(parser, ["lab", "demo", "--trampoline", "rfc-broken"])
    assert check_line(parser, ["lab", "boot", "--tasks", "N"])  # demo's option, not boot's
    assert not check_line(parser, ["lab", "demo", "--trampoline", "rfc"])


# ---- length, paths, the demo table -----------------------------------------

def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 260


DIRECTORIES = ("docs", "gdbklp", "tests", "bench", "qemu-images")


def paths_outside(root: Path = ROOT) -> list[str]:
    bad = []
    files = [root / "README.md"] + [p for d in DIRECTORIES for p in sorted((root / d).rglob("*"))]
    for path in files:
        if not path.is_file() or "__pycache__" in path.parts or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if "../shared" in text or "/work/shared" in text:
            bad.append(str(path.relative_to(root)))
    return bad


def test_no_file_points_outside_the_repository(tmp_path):
    assert not paths_outside(), paths_outside()
    # the check itself finds one
    (tmp_path / "README.md").write_text("see ../" + "shared/notes\n")
    for d in DIRECTORIES:
        (tmp_path / d).mkdir()
    assert paths_outside(tmp_path) == ["README.md"]


def test_readme_demo_table_has_the_comparison_header():
    header = workload.format_comparison([]).splitlines()[0]
    columns = re.split(r"\s{2,}|\s(?=\S+$)", header.strip())
    lines = [line for line in README.read_text().splitlines() if line.startswith("kind ")]
    assert lines, "no demo comparison table in README.md"
    assert [re.split(r"\s{2,}", line.strip()) for line in lines] == [re.split(r"\s{2,}", header.strip())], \
        (lines, header, columns)


# ---- one vocabulary -----------------------------------------------------------

# --record is record mode everywhere: it names the plugin's socket where the
# user's QEMU has one, and nothing where gdbklp boots QEMU with it (gdbklp lab)
SAME_NAME_OTHER_FORM = {"--record"}


def option_forms(parser, where: str, forms) -> None:
    """forms[option] += (what it takes, where), for parser and its subcommands."""
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                form = (action.nargs, action.metavar, tuple(action.choices or ()))
                forms.setdefault(option, set()).add((form, where))
    for name, sub in _subparsers(parser).items():
        option_forms(sub, f"{where} {name}", forms)


def test_an_option_name_means_one_thing_everywhere(monkeypatch):
    forms: dict[str, set] = {}
    option_forms(cli_parser(monkeypatch), "gdbklp", forms)
    for name, parser in gdb_parsers().items():
        option_forms(parser, name, forms)
    differing = {option: sorted(uses, key=str) for option, uses in forms.items()
                 if len({form for form, _ in uses}) > 1 and option not in SAME_NAME_OTHER_FORM}
    assert not differing, differing
    # what the issue of one vocabulary named: --json prints, --report FILE writes
    assert {form for form, _ in forms["--json"]} == {(0, None, ())}
    assert {form for form, _ in forms["--report"]} == {(None, "FILE", ())}
    assert {form for form, _ in forms["--run"]} == {(None, "CMD", ())}
    assert {form for form, _ in forms["--qemu"]} == {(None, None, ("lab", "host", "record"))}
