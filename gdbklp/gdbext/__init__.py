"""Everything of gdbklp that runs inside gdb; the only package importing gdb.

Each part registers its commands on import. load() imports them one by one:
a part that fails to load prints one line and the others still load.
"""

import importlib

# the gdb commands and functions, each a part of its own under commands/
PARTS = tuple(f"commands.{name}" for name in ("symbols", "watch", "frames", "unwinder", "transition", "lint"))
loaded: dict[str, object] = {}
failed: dict[str, str] = {}


def load(parts=PARTS) -> None:
    for name in parts:
        if name in loaded:
            continue
        try:
            loaded[name] = importlib.import_module(f"gdbklp.gdbext.{name}")
        except Exception as e:
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"gdbklp: part '{name}' not loaded: {failed[name]}")
