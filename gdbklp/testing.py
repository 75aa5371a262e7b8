"""pytest fixtures for kernel developers: boot a guest, attach gdb, watch, assert.

In a conftest.py:

    pytest_plugins = ["gdbklp.testing"]

    def test_my_patch(klp_watch):
        report = klp_watch.watch("klplab-run -t 4 -n 100")   # any shell command in the guest
        klp_watch.assert_clean(report)

The guest is the gdbklp lab unless GDBKLP_VMLINUX and GDBKLP_INITRAMFS name
your own images. Their /init must print "@@klplab-ready" on hvc0 when ready,
then run each line it reads from the console with sh and print
"@@klplab-done $?" after it (qemu-images/initramfs/init does exactly that).
"""

import os
from pathlib import Path

import pytest

from gdbklp.lab import build, session
from gdbklp.lab.session import WatchedGuest


def _images() -> build.LabImages:
    vmlinux, initramfs = os.environ.get("GDBKLP_VMLINUX"), os.environ.get("GDBKLP_INITRAMFS")
    if vmlinux and initramfs:
        return build.LabImages(vmlinux=Path(vmlinux), kernel_build=None, modules=None,
                               initramfs=Path(initramfs))
    return build.build_all()


@pytest.fixture(scope="module")
def klp_watch(tmp_path_factory):
    """A guest (the lab, or GDBKLP_VMLINUX + GDBKLP_INITRAMFS) with klp-watch ready."""
    images = _images()
    with session.booted(images, workdir=tmp_path_factory.mktemp("klp-guest")) as guest, \
            session.attached(guest, images.symbols) as gdb:
        gdb.cont()
        yield WatchedGuest(guest, gdb)
