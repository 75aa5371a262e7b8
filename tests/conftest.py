"""Shared fixtures: the built lab, a booted guest, gdb attached to it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gdbklp.lab import build, session
from gdbklp.lab import config as cfg
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


def pytest_addoption(parser):
    parser.addoption("--kernels", default=cfg.DEFAULT_KERNEL, metavar="GENERATIONS",
                     help="lab kernel generations the tests marked `generations` run on: comma-separated "
                          f"names of {', '.join(cfg.KERNELS)}, or all (default: {cfg.DEFAULT_KERNEL})")


def kernels_under_test(config) -> list[str]:
    value = config.getoption("--kernels")
    names = list(cfg.KERNELS) if value == "all" else value.split(",")
    unknown = [n for n in names if n not in cfg.KERNELS]
    if unknown:
        raise pytest.UsageError(f"--kernels: no lab generation {', '.join(unknown)} (known: {', '.join(cfg.KERNELS)})")
    return names


def pytest_generate_tests(metafunc):
    """A `generations` test that uses the lab runs on every generation --kernels
    names, unless it chooses its generations itself (parametrizing lab)."""
    chosen = any("lab" in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))
    if "lab" in metafunc.fixturenames and metafunc.definition.get_closest_marker("generations") and not chosen:
        metafunc.parametrize("lab", kernels_under_test(metafunc.config), indirect=True, scope="session",
                             ids=lambda name: f"linux-{name}")


@pytest.fixture(scope="session")
def lab(request):
    """The lab images of one generation (by default the default one), built
    (or verified in the cache) once per test run."""
    return build.build_all(kernel=getattr(request, "param", cfg.DEFAULT_KERNEL))


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
