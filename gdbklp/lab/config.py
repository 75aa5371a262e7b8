"""What the lab is made of, as data.

The builder (gdbklp.lab.build) and the guest runner (gdbklp.lab.qemu) read
everything from here: which Debian packages provide which tool, how the
kernel is configured, which modules and programs go into the initramfs and
how QEMU is started. Changing the lab means changing this file or the files
under qemu-images/ it names, both of which feed the build cache keys.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gdbklp import cache_root  # noqa: F401 (the lab's cache is gdbklp's)
from gdbklp.abi.designs import Design

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO_ROOT / "qemu-images"


def require_checkout() -> None:
    """The lab builds its kernels, modules and initramfs from the checkout's
    qemu-images/ and tests its mutants there: a wheel does not carry them.
    LabError, in one line, for an installed gdbklp."""
    if not IMAGES_DIR.is_dir():
        from gdbklp.lab import LabError
        raise LabError(f"the lab needs a checkout of gdbklp (it builds from its qemu-images/); this gdbklp is "
                       f"installed at {REPO_ROOT / 'gdbklp'}, which has none: watch your own guest instead "
                       "(gdbklp watch --attach, or gdb with `gdbklp gdbinit`)")


@dataclass(frozen=True)
class HostRequirement:
    """A file the host must have, and the Debian package that provides it."""

    path: str  # a command name (looked up on PATH) or an absolute path
    package: str


# Debian releases gdbklp runs on, by /etc/os-release VERSION_ID. The host
# needs the same few packages on each: everything the lab is built and run
# with comes from the lab root (LAB_ROOT), so every host builds it alike.
SUPPORTED_RELEASES = {"12": "bookworm", "13": "trixie"}

HOST_REQUIREMENTS = (
    HostRequirement("gdb-multiarch", "gdb-multiarch"),
    # the project's environment is a venv of the Python gdb embeds, which is
    # the distribution's python3 (./bootstrap asks gdb which one it is)
    HostRequirement(f"/usr/lib/python3.{sys.version_info.minor}/ensurepip/__init__.py", "python3-venv"),
    HostRequirement("mmdebstrap", "mmdebstrap"),  # makes the lab root
    HostRequirement("bwrap", "bubblewrap"),       # runs the lab's builds inside it
    # the host's own QEMU, kept as the lab's second QEMU (--qemu host): on
    # Debian 12 it is 7.2, which flushes its translations at every stop
    HostRequirement("qemu-system-ppc64", "qemu-system-ppc"),
    HostRequirement("apt-get", "apt"),
)


@dataclass(frozen=True)
class DebianRoot:
    """A Debian root made with mmdebstrap in the lab cache: the one toolchain,
    QEMU and package fetcher of every host. Its directory is named after a
    hash of this record, so a changed package list makes a new root."""

    suite: str
    packages: tuple[str, ...]
    # installed from the suite's backports, with the packages of the same
    # source they need from there
    backports: tuple[str, ...] = ()


LAB_ROOT = DebianRoot(
    suite="trixie",
    packages=(
        # the kernel and module builds: gcc >= 13 for -fpatchable-function-entry
        # on ppc64le ELFv2 (gcc 12 puts no nops after the local entry point)
        "make", "gcc", "libc6-dev", "gcc-powerpc64le-linux-gnu", "binutils-powerpc64le-linux-gnu",
        "libc6-dev-ppc64el-cross", "flex", "bison", "bc", "libssl-dev", "libelf-dev", "python3",
        "cpio", "xz-utils", "patch", "kmod",
        # the suite's own gdb and Python, for the CI run on Debian 13 inside the root
        "gdb-multiarch", "python3-venv", "ca-certificates",
        # the recorder plugin (qemu-images/plugin/): QEMU's plugin header includes <glib.h>
        "libglib2.0-dev", "pkgconf",
    ),
    # QEMU >= 10.2: its gdbstub no longer flushes the translation cache at every stop
    backports=("qemu-system-ppc", "qemu-system-common", "qemu-system-data"),
)
MIRROR = os.environ.get("GDBKLP_MIRROR", "http://deb.debian.org/debian")
# Debian's security archive: stable's kernel updates are published there
SECURITY_MIRROR = os.environ.get("GDBKLP_SECURITY_MIRROR", "http://deb.debian.org/debian-security")

# The other supported release, for CI's second run (`gdbklp lab other-release`):
# a Debian 12 host runs the checkout again in the lab root (Debian 13); a
# Debian 13 host, in this small Debian 12 root.
OTHER_RELEASE_ROOTS = {
    "bookworm": LAB_ROOT,
    "trixie": DebianRoot(suite="bookworm", packages=(
        "gdb-multiarch", "python3-venv", "ca-certificates", "bubblewrap", "mmdebstrap", "qemu-system-ppc")),
}


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package fetched into the lab cache by the lab root's apt,
    never installed anywhere."""

    name: str
    suite: str
    member: str  # the file wanted from it, a path inside the package
    # the archive index apt reads: the guest's architecture for its binaries;
    # "all" (architecture-independent: every index lists it) reads the lab
    # root's own, the one a mirror keeps in step first
    arch: str = "ppc64el"
    archive: str = ""  # the archive's URL; empty: MIRROR
    # one exact version (apt's, with its epoch), pinned: empty, the suite's current one
    version: str = ""
    # keep the .deb in the cache once the member is out of it (False for a
    # large package of which one file is wanted)
    keep_deb: bool = True

    @property
    def archive_url(self) -> str:
        return self.archive or MIRROR


# the `arch` of a package for the machine the lab runs on (the lab root's own architecture)
NATIVE = "native"


def linux_source(version: str, suite: str) -> DebianPackage:
    """Debian's kernel source tarball of one upstream version."""
    return DebianPackage(f"linux-source-{version}", suite, f"usr/src/linux-source-{version}.tar.xz", arch="all")


KERNEL_FRAGMENTS = IMAGES_DIR / "kernel"


@dataclass(frozen=True)
class KernelConfig:
    """One lab kernel generation: its source, configuration and what it can run."""

    name: str     # what --kernel calls it
    summary: str  # how ftrace enters a function and reaches livepatch_handler
    source: DebianPackage  # the tarball of Debian's linux-source package
    # fragments applied in order over base_configs (a later line wins)
    fragments: tuple[Path, ...]
    # the file holding ftrace_caller and livepatch_handler (what trampoline mutants edit)
    ftrace_source: str
    # the trampoline designs (TRAMPOLINES) it has; the first is the default
    trampolines: tuple[str, ...] = (Design.LIVEPATCH_STACK,)
    # applied in order with patch -p1 to the extracted source
    patches: tuple[Path, ...] = ()
    arch: str = "powerpc"
    cross_compile: str = "powerpc64le-linux-gnu-"
    # make targets run in order before the fragments are applied
    base_configs: tuple[str, ...] = ("tinyconfig", "64-bit.config", "le.config")
    # "modules" also writes Module.symvers and the module linker script
    build_targets: tuple[str, ...] = ("vmlinux", "modules")


KERNELS = {k.name: k for k in (
    KernelConfig(
        "6.1", "-mprofile-kernel (bl _mcount after mflr r0), livepatch_handler takes RA from LR",
        linux_source("6.1", "bookworm"),
        (KERNEL_FRAGMENTS / "common.config", KERNEL_FRAGMENTS / "6.1.config"),
        ftrace_source="arch/powerpc/kernel/trace/ftrace_mprofile.S",
        trampolines=(Design.LIVEPATCH_STACK, f"{Design.RFC}-fixed", Design.RFC),
        # the 2015 RFC's trampolines, chosen at boot with klp_trampoline=
        patches=(IMAGES_DIR / "kernel-patches" / "0001-powerpc-klp-rfc-trampolines.patch",)),
    KernelConfig(
        "6.12", "-fpatchable-function-entry (mflr r0; bl ftrace_caller at the local entry), "
                "livepatch_handler as in 6.1",
        linux_source("6.12", "trixie"),
        (KERNEL_FRAGMENTS / "common.config", KERNEL_FRAGMENTS / "6.12.config"),
        ftrace_source="arch/powerpc/kernel/trace/ftrace_entry.S",
        trampolines=(Design.LIVEPATCH_STACK, f"{Design.RFC}-fixed", Design.RFC),
        # the same RFC trampolines: ftrace_entry.S leaves RA in LR and r0 and C in CTR as 6.1's did
        patches=(IMAGES_DIR / "kernel-patches" / "6.12" / "0001-powerpc-klp-rfc-trampolines.patch",)),
    KernelConfig(
        "7.3", "patchable entry with out-of-line ftrace stubs and call ops, "
               "livepatch_handler takes RA from r0 and C from LR",
        linux_source("7.3", "trixie-backports"),
        (KERNEL_FRAGMENTS / "common.config", KERNEL_FRAGMENTS / "7.3.config"),
        ftrace_source="arch/powerpc/kernel/trace/ftrace_entry.S"),
)}
DEFAULT_KERNEL = "6.1"
KERNEL = KERNELS[DEFAULT_KERNEL]



@dataclass(frozen=True)
class DistributionKernel:
    """A distribution's own ppc64le kernel, as the distribution ships it:
    the lab boots it as a user's kernel (--vmlinux) and gdb reads its
    debug vmlinux. Pinned to one build: the lab is reproducible."""

    name: str
    image: DebianPackage  # member: the bootable vmlinux
    debug: DebianPackage  # member: the same vmlinux with its DWARF


def debian_kernel(abi: str, suite: str, archive: str) -> DistributionKernel:
    """Debian's powerpc64le kernel of one ABI (as "6.12.107+deb13")."""
    flavour = f"{abi}-powerpc64le"
    return DistributionKernel(
        f"debian-{abi}",
        DebianPackage(f"linux-image-{flavour}", suite, f"boot/vmlinux-{flavour}", archive=archive),
        # about 880 MB, for one 325 MB file: not kept
        DebianPackage(f"linux-image-{flavour}-dbg", suite, f"usr/lib/debug/boot/vmlinux-{flavour}",
                      archive=archive, keep_deb=False))


# Debian 13's kernel: distribution configuration, no CONFIG_LIVEPATCH
DEBIAN_KERNEL = debian_kernel("6.12.107+deb13", "trixie-security", SECURITY_MIRROR)

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
    busybox: DebianPackage
    busybox_applets: tuple[str, ...]
    init: Path
    # static programs: name in /bin -> C source, built with the cross compiler
    programs: dict[str, Path] = field(default_factory=dict)
    cflags: tuple[str, ...] = ("-static", "-O2", "-Wall")


INITRAMFS = InitramfsConfig(
    busybox=DebianPackage("busybox-static", "trixie", "usr/bin/busybox"),
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
    """A live-patch trampoline the lab kernel can run (klp_trampoline= at boot): a
    design, as posted or with its defects corrected (name: the design, -fixed)."""

    name: str
    design: Design
    summary: str
    # the call kinds (gdbklp.lab.workload.KINDS) it redirects without harm:
    # the demo's default workload
    kinds: tuple[str, ...]
    # seconds the demo waits for its workload (a design that breaks the guest ends it early)
    demo_timeout: float = 1800.0


TRAMPOLINES = {t.name: t for t in (
    Trampoline(Design.LIVEPATCH_STACK, Design.LIVEPATCH_STACK,
               "the merged design (livepatch_handler and the per-task livepatch stack)",
               ("local", "local_other", "global", "indirect", "many_args", "varargs", "sibling")),
    # a C with stack-passed arguments cannot run in a 32-byte mini frame (invariant 6)
    Trampoline(f"{Design.RFC}-fixed", Design.RFC, "the 2015 RFC's mini frame with its two defects corrected",
               ("local", "local_other", "global", "indirect", "sibling")),
    # the first global call is misrouted and its return address lost: one is enough to see it
    Trampoline(Design.RFC, Design.RFC,
               "the 2015 RFC's mini frame as posted (compare constant 0x18, return address lost)",
               ("global",), demo_timeout=30.0),
)}
DEFAULT_TRAMPOLINE = Design.LIVEPATCH_STACK


# The lab's QEMUs: the lab root's (QEMU >= 10.2: no translation flush at a
# stop), the host's (Debian 12: 7.2, which flushes) and the recorder's
# (RECORDER: trixie's 10.0, which loads the recorder plugin; it flushes at
# stops too). $GDBKLP_QEMU chooses.
QEMUS = {
    "lab": "the lab root's qemu-system-ppc64 (trixie-backports)",
    "host": "the host's qemu-system-ppc64 (Debian 12: 7.2, Debian 13: 10.0; "
            "both flush their translations at every stop)",
    "record": "trixie's qemu-system-ppc64 10.0 with the gdbklp recorder plugin (plugin API 4)",
}
DEFAULT_QEMU = "lab"


@dataclass(frozen=True)
class QemuConfig:
    program: str  # its path, in the lab root or on the host
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
    program="/usr/bin/qemu-system-ppc64",
    machine="pseries",
    cpu="power9",
    smp=2,
    memory="1G",
    accel="tcg,thread=single",
    append=("console=hvc0", "quiet", "loglevel=4"),
)


@dataclass(frozen=True)
class DebianSource:
    """One file of a Debian source package (its upstream tarball), fetched
    into the lab cache by the lab root's apt (apt-get source --download-only);
    refused if one of Debian's own patches changes it."""

    name: str
    version: str  # apt's, with its epoch
    suite: str
    member: str   # a path inside the upstream tree
    archive: str = ""  # empty: MIRROR

    @property
    def archive_url(self) -> str:
        return self.archive or MIRROR


PLUGIN_DIR = IMAGES_DIR / "plugin"


@dataclass(frozen=True)
class RecorderConfig:
    """The recorder: a QEMU TCG plugin (qemu-images/plugin/) that records
    registers and memory at probe points and streams them to gdbklp
    (gdbklp.recorder) with no gdbstub stop, and the QEMU it runs in. The lab
    root's QEMU (11.x) refuses plugins of API < 7 and no 11.x source is served
    here, so the recorder's QEMU is trixie's 10.0 (plugin API 4), its binary
    run with the lab root's libraries and firmware as the root's own QEMU is."""

    qemu: DebianPackage     # member: the qemu-system-ppc64 binary
    header: DebianSource    # member: include/qemu/qemu-plugin.h of the same QEMU
    sources: tuple[Path, ...]  # the plugin's C sources and header
    main: Path              # the file compiled (it includes the rest)
    library: str = "libklprecord.so"
    cflags: tuple[str, ...] = ("-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-std=gnu11", "-pthread")


QEMU_10_VERSION = "1:10.0.13+ds-0+deb13u1"
RECORDER = RecorderConfig(
    qemu=DebianPackage("qemu-system-ppc", "trixie", "usr/bin/qemu-system-ppc64", arch=NATIVE,
                       version=QEMU_10_VERSION),
    header=DebianSource("qemu", QEMU_10_VERSION, "trixie", "include/qemu/qemu-plugin.h"),
    sources=(PLUGIN_DIR / "klp_record.c", PLUGIN_DIR / "klp_record.h"),
    main=PLUGIN_DIR / "klp_record.c",
)
