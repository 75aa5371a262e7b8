"""Shared fixtures (the built lab, a booted guest, gdb attached to it) and the
hooks that mark each test by what it needs; shared helpers are in helpers.py."""

import pytest

from gdbklp.lab import build, ownkernel, session
from gdbklp.lab import config as cfg

# what a test needs, as markers; `lab` is added to a test with any of them
NEEDS = ("toolchain", "gdb", "guest")
# the needs of each fixture; a test that uses a fixture, or a fixture that
# depends on it, has them (tests that build or boot by themselves are marked
# explicitly)
FIXTURE_NEEDS = {"lab": {"toolchain"}, "guest": {"guest"}, "gdb": {"gdb"}, "klp_watch": {"guest", "gdb"},
                 "distribution_kernel": {"toolchain"}}


def pytest_collection_modifyitems(items):
    """Mark each test with what it needs: the markers of its fixtures and its
    own, `toolchain` with `guest` (a guest boots the lab's images in the lab
    root's QEMU), and `lab` with any need, so that `pytest -m "not lab"`
    never builds, boots or starts gdb."""
    for item in items:
        needs = {need for name in getattr(item, "fixturenames", ()) for need in FIXTURE_NEEDS.get(name, ())}
        needs |= {need for need in NEEDS if item.get_closest_marker(need)}
        if "guest" in needs:
            needs.add("toolchain")
        if not needs and item.get_closest_marker("lab"):
            raise pytest.UsageError(f"{item.nodeid}: mark it with what it needs ({', '.join(NEEDS)}), "
                                    "not `lab`")
        for need in needs:
            if not item.get_closest_marker(need):
                item.add_marker(need)
        if needs and not item.get_closest_marker("lab"):
            item.add_marker("lab")


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


@pytest.fixture(scope="session")
def distribution_kernel() -> build.LabImages:
    """Debian's own ppc64le kernel (config.DEBIAN_KERNEL) as a user's kernel
    in the lab: fetched into the lab cache once (about 960 MB), booted with
    the lab's initramfs, read by gdb from its -dbg vmlinux."""
    kernel = cfg.DEBIAN_KERNEL
    return ownkernel.own_images(ownkernel.OwnKernel(build.fetch_member(kernel.image),
                                                    build.fetch_member(kernel.debug)))
