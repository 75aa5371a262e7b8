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


def gdb_major() -> int:
    """gdb-multiarch's major version ("GNU gdb (Debian 16.3-1) 16.3" -> 16)."""
    first = subprocess.run([GDB, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return int(first.split()[-1].split(".")[0])


# klp-watch refuses --park under a gdb newer than the one it is tested with (gdbext/parking.py)
PARKING = GDB is not None and gdb_major() <= 13
needs_parking = pytest.mark.skipif(not PARKING, reason="gdb 16 aborts in parked watches: klp-watch refuses --park")
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
