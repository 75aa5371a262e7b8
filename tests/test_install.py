"""gdbklp installed as a user installs it: a wheel, in a new venv of the Python
gdb-multiarch embeds, loaded into gdb by what `gdbklp gdbinit` prints or
installs, with no checkout on gdb's sys.path. Nothing is downloaded: the
wheel is built from a copy of the sources with the project venv's setuptools,
and its one dependency the gdb side uses (capstone) is copied, file by file
as its RECORD lists them, from the project's venv."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import GDB, REPO

pytestmark = pytest.mark.gdb
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "gdbklp")


def gdb_python() -> str:
    """/usr/bin/pythonX.Y of the Python gdb-multiarch embeds."""
    out = subprocess.run([GDB, "-nx", "-batch", "-ex", "python import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60).stdout.split()
    return f"/usr/bin/python{out[-1]}"


def copy_distribution(name: str, site: Path) -> None:
    """An installed distribution's files (as its RECORD lists them) into site."""
    dist = importlib.metadata.distribution(name)
    copied = 0
    for file in dist.files:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # scripts outside site-packages; caches
        target = site / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(file), target)
        copied += 1
    assert copied, f"{name}: no file to copy"


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "GDBKLP_VENV"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A new venv of gdb's Python with the gdbklp wheel installed; its bin/."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", work / "dist", source], check=True, cwd=work, env=clean_env(), timeout=300)
    (wheel,) = (work / "dist").glob("gdbklp-*.whl")
    venv = work / "venv"
    subprocess.run([gdb_python(), "-m", "venv", venv], check=True, timeout=300)
    subprocess.run([venv / "bin/python", "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheel],
                   check=True, cwd=work, env=clean_env(), timeout=300)
    site = Path(subprocess.run([venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    copy_distribution("capstone", site)
    return venv / "bin"


def gdb_with(init: Path, *commands: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    cmd = [GDB, "-nx", "-batch", "-x", str(init)]
    for c in commands:
        cmd += ["-ex", c]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=clean_env(**env), timeout=180)


SHOW_PATHS = "python import sys, gdbklp, capstone; print('PATHS', gdbklp.__file__, capstone.__file__, *sys.path)"


def test_the_wheel_loads_in_gdb_without_a_checkout_and_lints_a_lab_kernel(installed, lab, tmp_path):
    init = tmp_path / "gdbklp.gdb"
    init.write_text(subprocess.run([installed / "gdbklp", "gdbinit"], capture_output=True, text=True, check=True,
                                   cwd=tmp_path, env=clean_env()).stdout)
    proc = gdb_with(init, SHOW_PATHS, "help klp-watch start", f"file {lab.vmlinux}", "klp-lint", cwd=tmp_path)
    assert "Traceback" not in proc.stdout + proc.stderr and "not loaded" not in proc.stdout, proc.stdout + proc.stderr
    (paths,) = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PATHS ")]
    venv = str(installed.parent)
    assert paths[0].startswith(venv) and paths[1].startswith(venv), paths
    assert not [p for p in paths[2:] if p.startswith(str(REPO))], paths  # no checkout on sys.path
    assert "usage: klp-watch start" in proc.stdout and "--record SOCKET" in proc.stdout
    assert proc.stdout.strip().endswith("klp-lint: clean"), proc.stdout[-2000:]


def test_the_lab_from_a_wheel_says_it_needs_a_checkout(installed, tmp_path):
    proc = subprocess.run([installed / "gdbklp", "lab", "build"], capture_output=True, text=True, cwd=tmp_path,
                          env=clean_env(), timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("gdbklp: the lab needs a checkout of gdbklp (it builds from its qemu-images/)")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_install_for_the_user_is_read_by_gdb_and_replaces_its_own_block(installed, tmp_path):
    home = tmp_path / "home"
    init = home / ".config/gdb/gdbinit"
    init.parent.mkdir(parents=True)
    init.write_text("set history save on\n")
    for _ in range(2):
        proc = subprocess.run([installed / "gdbklp", "gdbinit", "--install", "user"], capture_output=True,
                              text=True, cwd=tmp_path, env=clean_env(HOME=str(home)), timeout=60)
        assert proc.stdout == f"gdbklp: loaded by gdb-multiarch at start-up from {init}\n", proc.stderr
    text = init.read_text()
    assert text.startswith("set history save on\n") and text.count("# >>> gdbklp >>>") == 1
    # gdb without -nx: it reads the user's init file by itself
    proc = subprocess.run([GDB, "-batch", "-ex", "help klp-watch start"], capture_output=True, text=True,
                          cwd=tmp_path, env=clean_env(HOME=str(home)), timeout=120)
    assert "usage: klp-watch start" in proc.stdout, proc.stdout + proc.stderr


def test_a_gdb_with_another_python_is_refused_in_one_line(tmp_path):
    # the printed commands compare gdb's Python with the one gdbklp was installed for
    from gdbklp import gdbinit
    this = sysconfig.get_python_version()
    text = gdbinit.script().replace(repr(tuple(sys.version_info[:2])), "(2, 7)").replace(f"Python {this} (", "Python 2.7 (")
    init = tmp_path / "other.gdb"
    init.write_text(text)
    proc = gdb_with(init, "help klp-watch", cwd=tmp_path)
    assert [line for line in proc.stdout.splitlines() if line.startswith("gdbklp:")] == [
        f"gdbklp: not loaded: installed for Python 2.7 ({sys.prefix}), this gdb embeds Python {this}: "
        "install gdbklp with that Python"]
    assert 'Undefined command: "klp-watch"' in proc.stderr


def test_the_wheel_gives_pytest_the_klp_watch_fixture(installed):
    proc = subprocess.run([installed / "python", "-c", "from importlib.metadata import entry_points; "
                           "print(*(f'{e.name}={e.value}' for e in entry_points(group='pytest11')))"],
                          capture_output=True, text=True, check=True, env=clean_env())
    assert proc.stdout.split() == ["gdbklp.testing=gdbklp.testing"]
