"""The gdbklp lab: a ppc64le live-patching guest in QEMU, built from Debian packages."""


class LabError(Exception):
    """A lab failure the user can act on; str() is one complete line."""
