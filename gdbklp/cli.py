"""gdbklp command line: gdbklp lab build|boot|gdb|demo|..., gdbklp watch, gdbklp gdbinit."""

import argparse
import sys

from gdbklp import __version__
from gdbklp.errors import GdbklpError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gdbklp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gdbklp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="the ppc64le live-patching lab in QEMU")
    from gdbklp.lab import cli as lab_cli
    lab_cli.configure(lab)
    from gdbklp import monitor
    monitor.configure(sub.add_parser("watch", help="live monitor: klp-watch on a guest, full screen"))
    from gdbklp import gdbinit
    gdbinit.configure(sub.add_parser("gdbinit", help="the gdb commands that load this gdbklp into gdb-multiarch "
                                                     "(printed, or installed with --install)"))
    args = parser.parse_args(argv)
    try:
        if args.command == "lab" or getattr(args, "lab", False):
            from gdbklp.lab.config import require_checkout
            require_checkout()
        return args.func(args) or 0
    except GdbklpError as e:  # the lab's, gdb's and gdbklp's own: one line
        print(f"gdbklp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gdbklp: interrupted", file=sys.stderr)
        return 130
