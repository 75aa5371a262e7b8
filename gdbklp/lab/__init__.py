"""The gdbklp lab: a ppc64le live-patching guest in QEMU, built from Debian packages."""

import sys

from gdbklp.errors import GdbklpError


class LabError(GdbklpError):
    """A lab failure the user can act on; str() is one complete line."""


def log(msg: str) -> None:
    """A progress line of the lab's set-up, on stderr."""
    print(f"[lab] {msg}", file=sys.stderr, flush=True)
