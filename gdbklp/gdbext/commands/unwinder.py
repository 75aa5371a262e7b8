"""klp-unwinder on|off|status: switch the live-patch trampoline unwinder (gdbklp.gdbext.unwind)."""

import argparse

import gdb

from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.unwind import livepatch_unwinder


class KlpUnwinder(Command):
    """Switch gdbklp's live-patch trampoline unwinder: on | off | status."""

    name = "klp-unwinder"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("state", choices=("on", "off", "status"))

    def run(self, args: argparse.Namespace) -> None:
        unwinder = livepatch_unwinder(None if args.state == "status" else args.state == "on")
        error = f" (last error: {unwinder.last_error})" if unwinder.last_error else ""
        gdb.write(f"klp-unwinder: {'on' if unwinder.enabled else 'off'}{error}\n")


KlpUnwinder()
