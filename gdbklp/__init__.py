"""gdbklp: check ppc64le kernel live-patch redirections from gdb.

Layout:
  gdbklp.abi     pure-Python ELFv2/ppc64le knowledge (no gdb): ELF symbols,
                 call sites, frames, the livepatch stack.
  gdbklp.gdbext  everything that runs inside gdb (commands, breakpoints).
  gdbklp.lab     the QEMU lab: declarative config, cached builder, guest control.
"""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where gdbklp keeps what it builds or writes once (the lab's images, the
    gdb loader of gdbklp.gdbinit): $GDBKLP_CACHE or ~/.cache/gdbklp."""
    return Path(os.environ.get("GDBKLP_CACHE", Path.home() / ".cache" / "gdbklp"))
