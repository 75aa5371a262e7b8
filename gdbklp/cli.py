"""gdbklp command line: gdbklp lab build|boot|gdb|demo, gdbklp watch."""

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
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except GdbklpError as e:  # the lab's, gdb's and gdbklp's own: one line
        print(f"gdbklp: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gdbklp: interrupted", file=sys.stderr)
        return 130
