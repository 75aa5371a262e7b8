"""klp-unwinder on|off|status: switch gdbklp's unwinders (gdbklp.gdbext.unwind)."""

import argparse

import gdb

from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.unwind import livepatch_unwinder, traced_call_unwinder


class KlpUnwinder(Command):
    """Switch gdbklp's unwinders (live-patch trampolines, ftrace trampolines): on | off | status."""

    name = "klp-unwinder"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("state", choices=("on", "off", "status"),
                            help="on, off: switch both; status: say whether they are on, and their last errors")

    def run(self, args: argparse.Namespace) -> None:
        unwinder = livepatch_unwinder(None if args.state == "status" else args.state == "on")
        errors = [e for e in (unwinder.last_error, traced_call_unwinder.last_error) if e]
        error = f" (last error: {'; '.join(errors)})" if errors else ""
        gdb.write(f"klp-unwinder: {'on' if unwinder.enabled else 'off'}{error}\n")


KlpUnwinder()
