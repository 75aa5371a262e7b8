"""Load gdbklp into gdb-multiarch.

    gdb-multiarch -x gdbinit.d/gdbklp.py vmlinux

or, for every session, add "source /path/to/gdbinit.d/gdbklp.py" to ~/.gdbinit.
The project's environment (.venv, made by ./bootstrap setup from
the Python gdb embeds) provides capstone; GDBKLP_VENV
names another one.
"""

import os
import sys
from pathlib import Path


def _add_environment() -> None:
    root = Path(__file__).resolve().parent.parent
    venv = root / os.environ.get("GDBKLP_VENV", ".venv")  # relative to the repository
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if site.is_dir():
        if str(site) not in sys.path:
            sys.path.append(str(site))
    else:
        print(f"gdbklp: no {version} environment at {venv} (run ./bootstrap setup); "
              "loading without it: instruction display is off")


def _check_gdb_version() -> None:
    import gdb

    from gdbklp import versions
    version = tuple(int(part) for part in gdb.VERSION.split()[0].split(".")[:2] if part.isdigit())
    if version < versions.MIN_GDB:
        raise RuntimeError(f"gdbklp needs gdb {versions.dotted(versions.MIN_GDB)} or newer; this is gdb {gdb.VERSION}")


try:
    _add_environment()
    _check_gdb_version()
    import gdbklp.gdbext
    gdbklp.gdbext.load()
except Exception as e:  # one clear line, never a traceback at gdb start-up
    print(f"gdbklp: not loaded: {type(e).__name__}: {e}")
