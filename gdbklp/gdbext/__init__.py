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


def start() -> None:
    """Load every part into this gdb, or say in one line why not (a gdb older
    than gdbklp supports); what the loaders run, never a traceback."""
    try:
        import gdb

        from gdbklp import versions
        version = tuple(int(part) for part in gdb.VERSION.split()[0].split(".")[:2] if part.isdigit())
        if version < versions.MIN_GDB:
            print(f"gdbklp: not loaded: gdbklp needs gdb {versions.dotted(versions.MIN_GDB)} or newer; "
                  f"this is gdb {gdb.VERSION}")
            return
        load()
    except Exception as e:
        print(f"gdbklp: not loaded: {type(e).__name__}: {e}")
