"""Base class of gdbklp's gdb commands: argparse arguments, one-line errors."""

import argparse

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


class Command(gdb.Command):
    """A gdb command whose arguments are parsed by argparse.

    Subclasses set name and help (first line of the docstring), fill the
    parser in configure(), and implement run(args). Any failure reaches the
    user as one line: gdbklp errors as they are, anything unexpected with its
    exception type, never a traceback.
    """

    name = ""

    def __init__(self):
        super().__init__(self.name, gdb.COMMAND_USER)
        self.parser = _Parser(prog=self.name, description=(self.__doc__ or "").strip())
        self.configure(self.parser)

    def configure(self, parser: argparse.ArgumentParser) -> None:
        pass

    def run(self, args: argparse.Namespace) -> None:
        raise NotImplementedError

    def invoke(self, argument: str, from_tty: bool) -> None:
        try:
            args = self.parser.parse_args(gdb.string_to_argv(argument))
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
