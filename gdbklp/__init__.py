"""gdbklp: check ppc64le kernel live-patch redirections from gdb.

Layout:
  gdbklp.abi     pure-Python ELFv2/ppc64le knowledge (no gdb): ELF symbols,
                 call sites, frames, the livepatch stack.
  gdbklp.gdbext  everything that runs inside gdb (commands, breakpoints).
  gdbklp.lab     the QEMU lab: declarative config, cached builder, guest control.
"""

__version__ = "0.1.0"
