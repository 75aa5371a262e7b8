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
    # the project's environment is a venv of the Python gdb embeds, which is
    # the distribution's python3 (./bootstrap asks gdb which one it is)
    HostRequirement(f"/usr/lib/python3.{sys.version_info.minor}/ensurepip/__init__.py", "python3-venv"),
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


# ---- mutants: one defect each, to prove each check catches what it claims ------

FTRACE_S = "arch/powerpc/kernel/trace/ftrace_mprofile.S"
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
    code_point: str    # push half, return half, ftrace decision, RFC path, RFC helper, module loader, C
    defect: str
    invariant: int     # the invariant that must catch it
    edits: tuple[tuple[str, str, str], ...]
    run: str           # klplab-run arguments that exercise it
    trampoline: str = DEFAULT_TRAMPOLINE

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
    Mutant("c-unbalanced", "C", "C leaves livepatch_sp one entry higher", 10,
           ((PATCH_MODULE, "static noinline void new_body(unsigned long flags)\n{\n",
             "static noinline void new_body(unsigned long flags)\n{\n\tflags |= KLP_LAB_FAULT_UNBALANCED;\n"),),
           "-t 1 -n 3 -k local"),
)}
