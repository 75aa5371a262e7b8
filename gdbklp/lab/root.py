"""The lab root: a pinned Debian root in the lab cache that every host builds
and runs the lab with (config.LAB_ROOT).

Debian 12 has gcc 12, which cannot build the kernels from 6.6 on with
-fpatchable-function-entry, and QEMU 7.2, whose gdbstub flushes the whole
translation cache at every stop. Rather than two toolchains chosen per host,
every host makes the same Debian 13 root with mmdebstrap (21-25 s and
740 MB here, once per package list) and runs the lab's build commands in it with bubblewrap:
the same compiler makes the same kernel on every host, and the lab's QEMU is
the root's (trixie-backports, >= 10.2) everywhere.

The root is built in a ".partial" directory and renamed when complete, so a
failed build is never reused. Its directory is named after a hash of
config.LAB_ROOT; /etc/gdbklp-root inside it names the root and lists the
installed package versions, and tells a command that runs inside (CI's run
on the other release) that it is in the lab root.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
from dataclasses import asdict
from pathlib import Path

from gdbklp.lab import LabError, log
from gdbklp.lab import config as cfg

STAMP = "etc/gdbklp-root"  # in a root: "# gdbklp root SUITE KEY", then "package version" lines
NETWORK_ERRORS = ("Temporary failure resolving", "Could not resolve", "Failed to fetch",
                  "Could not connect", "Unable to connect", "Network is unreachable", "Connection timed out")


def root_key(spec: cfg.DebianRoot) -> str:
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]


def root_dir(spec: cfg.DebianRoot = cfg.LAB_ROOT) -> Path:
    return cfg.cache_root() / f"root-{spec.suite}-{root_key(spec)}"


def inside_lab_root() -> bool:
    """Whether this process runs inside the lab root (the CI's Debian 13 run
    on a Debian 12 host), where the lab's tools are the system's own."""
    stamp = Path("/", STAMP)
    header = stamp.read_text().split("\n", 1)[0].split() if stamp.exists() else []
    return header[-1:] == [root_key(cfg.LAB_ROOT)]


def archive_failure(output: str, what: str) -> LabError:
    """The error for a failed apt or mmdebstrap run: one line when the
    archive cannot be reached, else apt's last lines."""
    lines = output.strip().splitlines()
    for line in lines:
        if any(marker in line for marker in NETWORK_ERRORS):
            return LabError(f"{what}: cannot reach the Debian archive {cfg.MIRROR} ({line.strip()}); "
                            f"what is already in {cfg.cache_root()} still works")
    return LabError(f"{what} failed:\n" + "\n".join(lines[-12:]))


def mmdebstrap_command(spec: cfg.DebianRoot, target: Path) -> list[str]:
    backports = f"{spec.suite}-backports"
    sources = [f"deb {cfg.MIRROR} {spec.suite} main"]
    if spec.backports:
        sources.append(f"deb {cfg.MIRROR} {backports} main")
    include = [*spec.packages, *(f"{name}/{backports}" for name in spec.backports)]
    return [
        "mmdebstrap", "--variant=minbase", "--include=" + ",".join(include),
        f"--customize-hook=echo '# gdbklp root {spec.suite} {root_key(spec)}' > \"$1/{STAMP}\"",
        "--customize-hook=chroot \"$1\" dpkg-query -W -f '${Package} ${Version}\\n' >> \"$1/" + STAMP + '"',
        spec.suite, str(target), *sources,
    ]


def ensure_root(spec: cfg.DebianRoot = cfg.LAB_ROOT) -> Path:
    """The root's directory, made first if it is not complete in the cache."""
    if spec == cfg.LAB_ROOT and inside_lab_root():
        return Path("/")
    final = root_dir(spec)
    if (final / STAMP).exists():
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    what = "the lab root" if spec == cfg.LAB_ROOT else f"a Debian {spec.suite} root"
    log(f"making {what} ({spec.suite}, {len(spec.packages) + len(spec.backports)} packages) in {final}")
    proc = subprocess.run(mmdebstrap_command(spec, partial), capture_output=True, text=True)
    if proc.returncode != 0 or not (partial / STAMP).exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise archive_failure(proc.stdout + proc.stderr, f"making {what} {final.name}")
    if final.is_symlink() or final.is_file():
        final.unlink()
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def package_versions(root: Path) -> dict[str, str]:
    """The root's installed packages and their versions."""
    lines = (root / STAMP).read_text().splitlines()
    return dict(line.split(" ", 1) for line in lines if " " in line and not line.startswith("#"))


def host_settings() -> list[Path]:
    """The host's files that let pip and apt reach their indexes from inside
    the root (a machine's own CA bundle, pip configuration, local wheels)."""
    candidates = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf", "/etc/xdg/pip",
                  "/etc/resolv.conf", "/opt/wheels", "/opt/pypi", "/opt/pypi-more",
                  str(Path.home() / ".config" / "pip")]
    return [Path(c) for c in candidates if Path(c).exists()]


def wrap(cmd: list, cwd: Path | str | None = None, *, spec: cfg.DebianRoot = cfg.LAB_ROOT,
         binds=(), settings: bool = False) -> list[str]:
    """cmd as run inside a root (the lab root by default) with bubblewrap:
    the root as /, the lab cache, the repository and binds bound at their own
    paths (so paths in build trees are the same inside and out), a private /tmp;
    with settings, also the host's CA bundle and pip settings (host_settings).
    Inside that root already, cmd itself."""
    root = ensure_root(spec)
    if root == Path("/"):
        return [str(c) for c in cmd]
    argv = ["bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--chmod", "1777", "/tmp",  # apt verifies signatures there as _apt
            "--die-with-parent", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"]
    if os.geteuid() == 0:  # keep root's capabilities inside: a command there may use bubblewrap itself
        argv += ["--cap-add", "ALL"]
    cfg.cache_root().mkdir(parents=True, exist_ok=True)
    for path in (cfg.cache_root(), cfg.REPO_ROOT, *binds):
        argv += ["--bind", str(path), str(path)]
    if settings:
        for path in host_settings():
            argv += ["--ro-bind", str(path), str(path)]
    if cwd is not None:
        argv += ["--chdir", str(cwd)]
    return argv + [str(c) for c in cmd]


def elf_interpreter(path: Path) -> str:
    """The program interpreter (PT_INTERP) a 64-bit little-endian ELF executable names."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise LabError(f"{path} is not a 64-bit little-endian ELF executable")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
    raise LabError(f"{path} names no program interpreter")


def library_dirs(root: Path) -> list[Path]:
    """The root's library directories, as its own ld.so.conf lists them."""
    dirs, confs = [], [root / "etc/ld.so.conf"]
    while confs:
        conf = confs.pop(0)
        for line in conf.read_text().splitlines() if conf.exists() else ():
            line = line.split("#", 1)[0].strip()
            if line.startswith("include "):
                confs += sorted(root.glob(line.split(None, 1)[1].lstrip("/")))
            elif line:
                dirs.append(root / line.lstrip("/"))
    return [d for d in [*dirs, root / "lib", root / "usr/lib"] if d.is_dir()]


def host_command(root: Path, program: str) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) that run one of the root's programs as a
    host process: through the root's own dynamic loader and libraries, so
    the process is the program itself (its pid, its sockets), needs no
    namespace and sees the host's paths."""
    binary = root / program.lstrip("/")
    if not binary.exists():
        raise LabError(f"the lab root {root} has no {program}")
    if root == Path("/"):
        return [str(binary)], {}
    dirs = library_dirs(root)
    loader = root / elf_interpreter(binary).lstrip("/")
    env = {}
    modules = [d / "qemu" for d in dirs if (d / "qemu").is_dir()]
    if modules:
        env["QEMU_MODULE_DIR"] = str(modules[0])
    return [str(loader), "--library-path", ":".join(map(str, dirs)), str(binary)], env
