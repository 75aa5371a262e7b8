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
    ),
    # QEMU >= 10.2: its gdbstub no longer flushes the translation cache at every stop
    backports=("qemu-system-ppc", "qemu-system-common", "qemu-system-data"),
)
MIRROR = os.environ.get("GDBKLP_MIRROR", "http://deb.debian.org/debian")

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
    trampolines: tuple[str, ...] = ("livepatch-stack",)
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
        trampolines=("livepatch-stack", "rfc-fixed", "rfc"),
        # the 2015 RFC's trampolines, chosen at boot with klp_trampoline=
        patches=(IMAGES_DIR / "kernel-patches" / "0001-powerpc-klp-rfc-trampolines.patch",)),
    KernelConfig(
        "6.12", "-fpatchable-function-entry (mflr r0; bl ftrace_caller at the local entry), "
                "livepatch_handler as in 6.1",
        linux_source("6.12", "trixie"),
        (KERNEL_FRAGMENTS / "common.config", KERNEL_FRAGMENTS / "6.12.config"),
        ftrace_source="arch/powerpc/kernel/trace/ftrace_entry.S",
        trampolines=("livepatch-stack", "rfc-fixed", "rfc"),
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


# The lab's QEMUs: the lab root's (QEMU >= 10.2: no translation flush at a
# stop) and the host's (Debian 12: 7.2, which flushes). $GDBKLP_QEMU chooses.
QEMUS = {
    "lab": "the lab root's qemu-system-ppc64 (trixie-backports)",
    "host": "the host's qemu-system-ppc64 (Debian 12: 7.2, Debian 13: 10.0; "
            "both flush their translations at every stop)",
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


# ---- mutants: one defect each, to prove each check catches what it claims ------

FTRACE_S = KERNELS["6.1"].ftrace_source
FTRACE_ENTRY_S = KERNELS["7.3"].ftrace_source
FTRACE_C = "arch/powerpc/kernel/trace/ftrace.c"
MODULE_LOADER = "arch/powerpc/kernel/module_64.c"
PATCH_MODULE = "modules/klp_lab_patch.c"  # modules/: a file of qemu-images/modules


@dataclass(frozen=True)
class Mutant:
    """A small edit of the lab's kernel or modules that breaks one invariant.

    edits are (path, text, replacement): path in the kernel tree, or
    modules/NAME for the lab's modules; text must occur exactly once.
    A kernel edit builds a kernel variant from the lab's build tree
    (only what the edit touches is rebuilt); a module edit, modules and an
    initramfs built against the lab's kernel.
    """

    name: str
    # push half, return half, ftrace decision, ftrace exit, ftrace stubs, RFC path, RFC helper, module loader, C
    code_point: str
    defect: str
    invariant: int     # the invariant that must catch it
    edits: tuple[tuple[str, str, str], ...]
    run: str           # klplab-run arguments that exercise it
    trampoline: str = DEFAULT_TRAMPOLINE
    kernel: str = "6.1"  # the generation (KERNELS) it edits
    handoff: bool = False  # caught by klp-watch --handoff (invariant 14 at livepatch_handler's entry)

    @property
    def kernel_edits(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(e for e in self.edits if not e[0].startswith("modules/"))

    @property
    def module_edits(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(e for e in self.edits if e[0].startswith("modules/"))


MUTANTS = {m.name: m for m in (
    Mutant("push-no-magic", "push half", "the push never stores the magic", 8,
           ((FTRACE_S, "\tori     r12, r12, STACK_END_MAGIC@l\n\tstd\tr12, -8(r11)\n",
             "\tori     r12, r12, STACK_END_MAGIC@l\n\tnop\n"),), "-t 1 -n 3 -k local"),
    Mutant("push-swapped-slots", "push half", "the push saves r2 in the RA slot and RA in the TOC slot", 9,
           ((FTRACE_S, "\tstd\tr2,  -24(r11)\n\tmflr\tr12\n\tstd\tr12, -16(r11)\n",
             "\tstd\tr2,  -16(r11)\n\tmflr\tr12\n\tstd\tr12, -24(r11)\n"),), "-t 1 -n 3 -k local"),
    Mutant("push-32-bytes", "push half", "the push allocates 32 bytes, the pop frees 24", 9,
           ((FTRACE_S, "\t/* Allocate 3 x 8 bytes */\n\tld\tr11, TI_livepatch_sp(r12)\n\taddi\tr11, r11, 24\n",
             "\t/* Allocate 3 x 8 bytes */\n\tld\tr11, TI_livepatch_sp(r12)\n\taddi\tr11, r11, 32\n"),),
           "-t 1 -n 3 -k local"),
    Mutant("pop-ra-from-toc-slot", "return half", "the pop loads LR from the TOC slot", 9,
           ((FTRACE_S, "\tld\tr12, -16(r11)\n\tmtlr\tr12\n", "\tld\tr12, -24(r11)\n\tmtlr\tr12\n"),),
           "-t 1 -n 3 -k local"),
    Mutant("pop-no-toc-restore", "return half", "the pop does not restore r2", 9,
           ((FTRACE_S, "\tld\tr2,  -24(r11)\n\n\t/* Pop livepatch stack frame */",
             "\tnop\n\n\t/* Pop livepatch stack frame */"),), "-t 1 -n 3 -k local"),
    Mutant("pop-16-bytes", "return half", "the pop frees 16 bytes of 24: silent, the stack creeps", 9,
           ((FTRACE_S, "\tsubi\tr11, r11, 24\n", "\tsubi\tr11, r11, 16\n"),), "-t 1 -n 3 -k local"),
    Mutant("pop-never", "return half", "the pop never stores livepatch_sp back", 9,
           ((FTRACE_S, "\tsubi\tr11, r11, 24\n\tstd\tr11, TI_livepatch_sp(r12)\n",
             "\tsubi\tr11, r11, 24\n\tnop\n"),), "-t 1 -n 3 -k local"),
    Mutant("ftrace-no-redirect", "ftrace decision", "ftrace_caller enters C directly, never through "
           "livepatch_handler", 7,
           ((FTRACE_S, "\tbne-\tlivepatch_handler\n#endif\n\tbctr\t\t\t/* jump after _mcount site */",
             "\tnop\n#endif\n\tbctr\t\t\t/* jump after _mcount site */"),), "-t 1 -n 3 -k local"),
    Mutant("rfc-fixed-compare-0x18", "RFC path", "the compare constant built with li after lis (0x18)", 2,
           ((FTRACE_S, "\tlis\tr11, 0xe841\n\tori\tr11, r11, 0x18\n", "\tlis\tr11, 0xe841\n\tli\tr11, 0x18\n"),),
           "-t 1 -n 3 -k global", trampoline="rfc-fixed"),
    Mutant("rfc-fixed-helper-short-pop", "RFC helper", "the helper pops 16 bytes of the 32-byte mini frame", 9,
           ((FTRACE_S, "\taddi\tr1, r1, 32\t\t/* pop first */\n", "\taddi\tr1, r1, 16\t\t/* pop first */\n"),),
           "-t 1 -n 3 -k local", trampoline="rfc-fixed"),
    Mutant("loader-no-toc-restore", "module loader", "calls to klp_lab_b_global keep their nop: A never "
           "reloads its TOC", 9,
           ((MODULE_LOADER, "\t\t\tif (!restore_r2(strtab + sym->st_name,",
             "\t\t\tif (strncmp(strtab + sym->st_name, \"klp_lab_b_\", 10) &&\n"
             "\t\t\t    !restore_r2(strtab + sym->st_name,"),), "-t 1 -n 3 -k global"),
    Mutant("c-clobbers-toc-slot", "C", "C overwrites A's TOC save slot, as a tail call through a stub does", 3,
           ((PATCH_MODULE, "static noinline void new_body(unsigned long flags)\n{\n",
             "static noinline void new_body(unsigned long flags)\n{\n\tflags |= KLP_LAB_FAULT_TOC_SLOT;\n"),),
           "-t 1 -n 3 -k global"),
    # out-of-line ftrace stubs (7.x): invariant 14
    Mutant("ool-r15-clobbered", "ftrace exit", "ftrace_caller no longer puts A's r15 back: it keeps its own "
           "return address (into the stub) there", 14,
           ((FTRACE_ENTRY_S, "1:\tmtlr\tr3\n\t.if \\allregs == 0\n\tREST_GPR(15, r1)\n\t.endif\n",
             "1:\tmtlr\tr3\n"),), "-t 1 -n 3 -k local", kernel="7.3", handoff=True),
    Mutant("ool-handler-ra-from-lr", "push half", "livepatch_handler saves LR (C, with out-of-line stubs) as RA, "
           "as it did before them", 14,
           ((FTRACE_ENTRY_S, "\tstd\tr0, -16(r11)\n\tmflr\tr12\n",
             "\tmflr\tr12\n\tstd\tr12, -16(r11)\n"),), "-t 1 -n 3 -k local", kernel="7.3", handoff=True),
    Mutant("ool-stub-skips-an-instruction", "ftrace stubs", "a module's out-of-line stubs return to the traced "
           "site + 8, past B's first instruction", 14,
           ((FTRACE_C, "rec->ip + MCOUNT_INSN_SIZE, 0))", "rec->ip + (mod ? 2 : 1) * MCOUNT_INSN_SIZE, 0))"),),
           "-t 1 -n 3 -k local", kernel="7.3"),
    Mutant("c-unbalanced", "C", "C leaves livepatch_sp one entry higher", 10,
           ((PATCH_MODULE, "static noinline void new_body(unsigned long flags)\n{\n",
             "static noinline void new_body(unsigned long flags)\n{\n\tflags |= KLP_LAB_FAULT_UNBALANCED;\n"),),
           "-t 1 -n 3 -k local"),
)}
