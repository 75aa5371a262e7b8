"""Shared fixtures: the built lab, a booted guest, gdb attached to it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gdbklp.lab import build, session
from gdbklp.lab import root as labroot

REPO = Path(__file__).resolve().parent.parent
GDB = shutil.which("gdb-multiarch")


# gdb 16.3 aborts ("Recursive internal problem.") in parked watches when it
# runs inside the lab root's bubblewrap sandbox, which only CI's run on the
# other release does; on a Debian 13 installation they pass
PARKING = not labroot.inside_lab_root()
needs_parking = pytest.mark.skipif(not PARKING, reason="gdb 16.3 aborts in parked watches inside the lab root's "
                                   "sandbox (README: Known problem)")
LAB_FIXTURES = {"lab", "guest", "gdb", "klp_watch"}


def pytest_collection_modifyitems(items):
    """A test that uses the lab (its images, a guest, gdb attached) is a `lab`
    test, however its module is marked: `pytest -m "not lab"` never builds or boots."""
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab():
    """The lab images, built (or verified in the cache) once per test run."""
    return build.build_all()


@pytest.fixture(scope="module")
def guest(lab, tmp_path_factory):
    with session.booted(lab, workdir=tmp_path_factory.mktemp("guest")) as g:
        yield g


@pytest.fixture(scope="module")
def gdb(guest, lab):
    with session.attached(guest, lab.vmlinux) as g:
        g.cont()
        yield g


def in_lab_root(*cmd, where: Path) -> None:
    """Run a tool of the lab root (the cross toolchain, cpio: the host has
    none of them) on files under where."""
    subprocess.run(labroot.wrap(list(cmd), where, binds=(where,)), check=True)


def run_gdb_batch(*commands: str, args=(), timeout=120) -> subprocess.CompletedProcess:
    """gdb-multiarch -batch with gdbklp loaded and the given -ex commands."""
    cmd = [GDB, "-nx", "-batch", *args, "-x", str(REPO / "gdbinit.d" / "gdbklp.py")]
    for c in commands:
        cmd += ["-ex", c]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
