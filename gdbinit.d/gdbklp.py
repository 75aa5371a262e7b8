"""Load gdbklp into gdb-multiarch from this checkout.

    gdb-multiarch -x gdbinit.d/gdbklp.py vmlinux

The checkout's environment (.venv, made by ./bootstrap setup from the Python
gdb embeds) provides capstone; GDBKLP_VENV names another one. An installed
gdbklp loads with the commands `gdbklp gdbinit` prints (or installs).
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


try:
    _add_environment()
    import gdbklp.gdbext
except Exception as e:  # one clear line, never a traceback at gdb start-up
    print(f"gdbklp: not loaded: {type(e).__name__}: {e}")
else:
    gdbklp.gdbext.start()
