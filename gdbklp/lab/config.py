"""What the lab is made of, as data.

The builder (gdbklp.lab.build) and the guest runner (gdbklp.lab.qemu) read
everything from here: which Debian packages provide which tool, how the
kernel is configured, which modules and programs go into the initramfs and
how QEMU is started. Changing the lab means changing this file or the files
under qemu-images/ it names, both of which feed the build cache keys.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO_ROOT / "qemu-images"


def cache_root() -> Path:
    """Where built artefacts live: $GDBKLP_CACHE or ~/.cache/gdbklp."""
    return Path(os.environ.get("GDBKLP_CACHE", Path.home() / ".cache" / "gdbklp"))


@dataclass(frozen=True)
class HostRequirement:
    """A file the host must have, and the Debian package that provides it."""

    path: str  # a command name (looked up on PATH) or an absolute path
    package: str


HOST_REQUIREMENTS = (
    HostRequirement("qemu-system-ppc64", "qemu-system-ppc"),
    HostRequirement("gdb-multiarch", "gdb-multiarch"),
    HostRequirement("powerpc64le-linux-gnu-gcc", "gcc-powerpc64le-linux-gnu"),
    HostRequirement("powerpc64le-linux-gnu-ld", "binutils-powerpc64le-linux-gnu"),
    HostRequirement("/usr/powerpc64le-linux-gnu/lib/libc.a", "libc6-dev-ppc64el-cross"),
    HostRequirement("/usr/src/linux-source-6.1.tar.xz", "linux-source-6.1"),
    HostRequirement("make", "make"),
    HostRequirement("flex", "flex"),
    HostRequirement("bison", "bison"),
    HostRequirement("bc", "bc"),
    HostRequirement("xz", "xz-utils"),
    HostRequirement("patch", "patch"),
    HostRequirement("apt-get", "apt"),
    HostRequirement("dpkg-deb", "dpkg"),
    HostRequirement("/usr/include/openssl/ssl.h", "libssl-dev"),
    HostRequirement("/usr/include/libelf.h", "libelf-dev"),
    HostRequirement("cpio", "cpio"),
    # the project's environment is a venv of the Python gdb embeds
    HostRequirement("/usr/lib/python3.11/ensurepip/__init__.py", "python3-venv"),
)


@dataclass(frozen=True)
class KernelConfig:
    source_tarball: Path
    arch: str
    cross_compile: str
    # make targets run in order before the fragment is applied
    base_configs: tuple[str, ...]
    fragment: Path
    # applied in order with patch -p1 to the extracted source
    patches: tuple[Path, ...] = ()
    # "modules" also writes Module.symvers and the module linker script
    build_targets: tuple[str, ...] = ("vmlinux", "modules")


KERNEL = KernelConfig(
    source_tarball=Path("/usr/src/linux-source-6.1.tar.xz"),
    arch="powerpc",
    cross_compile="powerpc64le-linux-gnu-",
    base_configs=("tinyconfig", "64-bit.config", "le.config"),
    fragment=IMAGES_DIR / "kernel.config",
    # the 2015 RFC's trampolines, chosen at boot with klp_trampoline=
    patches=(IMAGES_DIR / "kernel-patches" / "0001-powerpc-klp-rfc-trampolines.patch",),
)


@dataclass(frozen=True)
class ModulesConfig:
    source_dir: Path
    names: tuple[str, ...]
    # modules the kernel build makes, by path in its tree: the kernel's own
    # livepatch sample patches cmdline_proc_show, reached through seq_file's
    # show pointer (an indirect call), as real patches usually are
    from_kernel: tuple[str, ...] = ()


MODULES = ModulesConfig(
    source_dir=IMAGES_DIR / "modules",
    names=("klp_lab_target", "klp_lab_caller", "klp_lab_patch"),
    from_kernel=("samples/livepatch/livepatch-sample.ko",),
)


@dataclass(frozen=True)
class InitramfsConfig:
    # ppc64el packages downloaded with apt into the cache, never elsewhere
    target_packages: tuple[str, ...]
    busybox: str  # path of busybox inside its package
    busybox_applets: tuple[str, ...]
    init: Path
    # static programs: name in /bin -> C source, built with the cross compiler
    programs: dict[str, Path] = field(default_factory=dict)
    cflags: tuple[str, ...] = ("-static", "-O2", "-Wall")


INITRAMFS = InitramfsConfig(
    target_packages=("busybox-static",),
    busybox="bin/busybox",
    busybox_applets=(
        "sh", "ash", "cat", "cttyhack", "dmesg", "echo", "grep", "insmod", "ls",
        "lsmod", "mkdir", "mount", "poweroff", "ps", "rmmod", "setsid", "sleep",
        "stty", "sync", "tr", "uname", "head", "tail", "wc", "seq", "true", "false",
    ),
    init=IMAGES_DIR / "initramfs" / "init",
    programs={"klplab-run": IMAGES_DIR / "initramfs" / "klplab-run.c"},
)


@dataclass(frozen=True)
class Trampoline:
    """A live-patch trampoline design the lab kernel can run (klp_trampoline= at boot)."""

    name: str
    summary: str
    # the call kinds (gdbklp.lab.workload.KINDS) it redirects without harm:
    # the demo's default workload
    kinds: tuple[str, ...]
    # seconds the demo waits for its workload (a design that breaks the guest ends it early)
    demo_timeout: float = 1800.0


TRAMPOLINES = {t.name: t for t in (
    Trampoline("livepatch-stack", "the merged design (livepatch_handler and the per-task livepatch stack)",
               ("local", "local_other", "global", "indirect", "many_args", "varargs", "sibling")),
    # a C with stack-passed arguments cannot run in a 32-byte mini frame (invariant 6)
    Trampoline("rfc-fixed", "the 2015 RFC's mini frame with its two defects corrected",
               ("local", "local_other", "global", "indirect", "sibling")),
    # the first global call is misrouted and its return address lost: one is enough to see it
    Trampoline("rfc", "the 2015 RFC's mini frame as posted (compare constant 0x18, return address lost)",
               ("global",), demo_timeout=30.0),
)}
DEFAULT_TRAMPOLINE = "livepatch-stack"


@dataclass(frozen=True)
class QemuConfig:
    binary: str
    machine: str
    cpu: str
    smp: int
    memory: str
    # single-threaded TCG: QEMU 7.2's MTTCG gdbstub can report one breakpoint
    # hit twice when both vCPUs hit it at once
    accel: str
    append: tuple[str, ...]
    # console markers printed by the lab's /init
    ready_marker: str = "@@klplab-ready"
    done_marker: str = "@@klplab-done"


QEMU = QemuConfig(
    binary="qemu-system-ppc64",
    machine="pseries",
    cpu="power9",
    smp=2,
    memory="1G",
    accel="tcg,thread=single",
    append=("console=hvc0", "quiet", "loglevel=4"),
)
