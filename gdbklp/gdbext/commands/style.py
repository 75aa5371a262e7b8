"""Styling of what gdbklp's commands print: a PROBLEM line (klp-frames), a
violation (klp-watch, klp-transition), an ERROR verdict (klp-lint).

gdb 13's Python has no style API, so these lines get ANSI escapes of their
own, in gdb's "highlight" style (`set style highlight foreground ...`), and
only when gdb would style its own output: `set style enabled on` and gdb's
output a terminal. Batch mode turns gdb's styling off and gdb/MI's output is
a pipe: what scripts and tests read stays plain text. Not a command: nothing
registers here (the pure part needs no gdb).
"""

import os

# what a line starts with (after its indentation) to be styled
MARKERS = ("PROBLEM:", "VIOLATION", "ERROR", "klp-watch: invariant", "invariants violated:")

_COLOURS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")
_INTENSITY = {"bold": "1", "dim": "2"}
RESET = "\033[m"


def sgr(foreground: str = "red", background: str = "none", intensity: str = "bold") -> str:
    """The escape that starts a style given as gdb names it (colour names;
    any other colour, gdb 16's numbers and #RRGGBB too, is left as the terminal's)."""
    codes = [_INTENSITY[intensity]] if intensity in _INTENSITY else []
    if foreground in _COLOURS:
        codes.append(str(30 + _COLOURS.index(foreground)))
    if background in _COLOURS:
        codes.append(str(40 + _COLOURS.index(background)))
    return f"\033[{';'.join(codes)}m" if codes else ""


def emphasize(text: str, start: str | None) -> str:
    """text with every line that starts with a marker styled by start (no styling if None)."""
    if not start:
        return text
    return "\n".join(f"{start}{line}{RESET}" if line.lstrip().startswith(MARKERS) else line
                     for line in text.split("\n"))


def current() -> str | None:
    """The escape for the lines to emphasize now: None unless gdb styles its output."""
    import gdb
    try:
        if not gdb.parameter("style enabled") or not os.isatty(1):
            return None
        return sgr(*(str(gdb.parameter(f"style highlight {part}")).lower()
                     for part in ("foreground", "background", "intensity")))
    except (gdb.error, RuntimeError, OSError):
        return None


def styled(text: str) -> str:
    """text with its marked lines styled as gdb's settings say."""
    return emphasize(text, current())
