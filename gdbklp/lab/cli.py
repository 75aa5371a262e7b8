"""gdbklp lab subcommands."""

import argparse

from gdbklp.lab import build


def cmd_build(args) -> int:
    images = build.build_all()
    for name, path in vars(images).items():
        print(f"{name}: {path}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    p = sub.add_parser("build", help="build (or verify the cached) kernel, modules and initramfs")
    p.set_defaults(func=cmd_build)
