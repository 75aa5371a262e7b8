"""gdbklp's error type, below every other module (pure Python, no gdb).

A GdbklpError is a failure the user caused or must act on: its str() is one
complete line, printed as it is by the gdb commands and the command line.
"""


class GdbklpError(Exception):
    """A user-facing failure; str() is one complete line."""
