"""Base class of gdbklp's gdb commands: argparse arguments, one-line errors,
help and completion generated from the same parsers."""

import argparse
import inspect
import os

import gdb

from gdbklp.errors import GdbklpError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise gdb.GdbError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        if message:
            gdb.write(message)
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def help_text(doc: str, parser: argparse.ArgumentParser, usage_only: bool = False) -> str:
    """gdb's help for a command: doc's first paragraph as one line (gdb lists
    commands by their first line), its other paragraphs, then the parser's
    usage and options (its usage only, for a prefix: gdb lists the subcommands)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    summary = " ".join(paragraphs[0].split())
    if usage_only:
        usage = parser.format_usage()
    else:
        description, parser.description = parser.description, None  # it is doc
        try:
            usage = parser.format_help()
        finally:
            parser.description = description
    return "\n\n".join([summary, *paragraphs[1:], usage.strip()])


def subparsers_of(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, help) of each subcommand parser has."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return found


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and action.option_strings != []


def candidates(parser: argparse.ArgumentParser, before: list[str], current: str) -> list[str] | None:
    """What may complete current, the word being typed after the words before:
    an option's choices, its options, a positional's choices; None for a
    file name (an option whose value is a FILE or SOCKET)."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    previous = options.get(before[-1]) if before else None
    if previous is not None and _takes_value(previous) and not current.startswith("-"):
        if previous.choices:
            return [str(c) for c in previous.choices]
        return None if previous.metavar in ("FILE", "SOCKET") else []
    if current.startswith("-"):
        return [s for s in options if s.startswith("--")] + [s for s in options if not s.startswith("--")]
    positional = [str(c) for a in parser._actions if not a.option_strings and a.choices
                  and not isinstance(a, argparse._SubParsersAction) for c in a.choices]
    return positional or [s for s in options if s.startswith("--")]


def file_names(current: str) -> list[str]:
    """The files and directories (these ending in '/') whose path starts with current."""
    directory, stem = os.path.split(current)
    try:
        names = sorted(n for n in os.listdir(os.path.expanduser(directory) or ".") if n.startswith(stem))
    except OSError:
        return []
    paths = [os.path.join(directory, n) for n in names]
    return [p + "/" if os.path.isdir(os.path.expanduser(p)) else p for p in paths]


def complete_arguments(parser: argparse.ArgumentParser, text: str, word: str | None):
    """gdb's complete(text, word) from parser: the matching option strings,
    an option's choices, or file names (gdb's own file name completer,
    gdb.COMPLETE_FILENAME, would complete the whole text, options too)."""
    if word is None:
        # gdb's first pass, which asks where words break: as for a file name,
        # where '-' does not break a word (for gdb's commands it does)
        return gdb.COMPLETE_FILENAME
    words = text.split()
    current = "" if not words or text[-1:].isspace() else words[-1]
    found = candidates(parser, words[:-1] if current else words, current)
    if found is None:
        found = file_names(current)
    # gdb replaces word, the end of current that follows a break character
    skip = len(current) - len(word) if current.endswith(word) else 0
    return [c[skip:] for c in found if c.startswith(current)]


class Command(gdb.Command):
    """A gdb command whose arguments are parsed by argparse.

    Subclasses set name and help (the docstring: its first paragraph is the
    summary gdb lists), fill the parser in configure(), and implement
    run(args). `help NAME` shows the docstring and the parser's usage and
    options; TAB completes the parser's options. A parser with subcommands
    makes a gdb prefix command, each subcommand a gdb command of its own
    (`help NAME SUB`, completion of its options), parsed by this parser as
    before. Any failure reaches the user as one line: gdbklp errors as they
    are, anything unexpected with its exception type, never a traceback.
    """

    name = ""

    def __init__(self):
        self.parser = _Parser(prog=self.name, description=(self.__doc__ or "").strip())
        self.configure(self.parser)
        subcommands = subparsers_of(self.parser)
        self.__doc__ = help_text(type(self).__doc__, self.parser, usage_only=bool(subcommands))
        super().__init__(self.name, gdb.COMMAND_USER, prefix=bool(subcommands))
        self.subcommands = [Subcommand(self, name, parser, text) for name, parser, text in subcommands]

    def configure(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> None:
        raise NotImplementedError

    def invoke(self, argument: str, from_tty: bool) -> None:
        self.parse_and_run(gdb.string_to_argv(argument))

    def complete(self, text: str, word: str | None):
        return complete_arguments(self.parser, text, word)

    def parse_and_run(self, argv: list[str]) -> None:
        try:
            args = self.parser.parse_args(argv)
            self.run(args)
        except _HelpShown:
            pass
        except gdb.GdbError:
            raise
        except GdbklpError as e:
            raise gdb.GdbError(f"{self.name}: {e}") from None
        except gdb.MemoryError as e:
            raise gdb.GdbError(f"{self.name}: cannot read target memory: {e}") from None
        except gdb.error as e:
            raise gdb.GdbError(f"{self.name}: {e}") from None
        except Exception as e:  # a bug: still one line, with what it was
            raise gdb.GdbError(f"{self.name}: internal error: {type(e).__name__}: {e}") from None


class Subcommand(gdb.Command):
    """`PREFIX ACTION ...`: run as `PREFIX ACTION ...` always ran, through the
    prefix's parser (the same checks, the same one-line errors); its help and
    completion are ACTION's parser's."""

    def __init__(self, prefix: Command, action: str, parser: argparse.ArgumentParser, summary: str):
        self.prefix, self.action, self.parser = prefix, action, parser
        summary = summary[:1].upper() + summary[1:]
        self.__doc__ = help_text(summary if summary.endswith(".") else summary + ".", parser)
        super().__init__(f"{prefix.name} {action}", gdb.COMMAND_USER)

    def invoke(self, argument: str, from_tty: bool) -> None:
        self.prefix.parse_and_run([self.action, *gdb.string_to_argv(argument)])

    def complete(self, text: str, word: str | None):
        return complete_arguments(self.parser, text, word)
