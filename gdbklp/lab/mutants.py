"""The lab's mutants: small edits of the kernel or the lab's modules that each
break one invariant, to prove that the check claiming it catches it
(tests/test_mutants_lab.py runs a few, bench/mutation.py all, in every mode)."""

from dataclasses import dataclass
from enum import StrEnum

from gdbklp.lab.config import DEFAULT_TRAMPOLINE, KERNELS


class MutatedCode(StrEnum):
    """The code a mutant breaks."""

    PUSH_HALF = "push half"              # livepatch_handler, up to its bctrl into C
    RETURN_HALF = "return half"          # livepatch_handler, after C returns (P3 on)
    FTRACE_DECISION = "ftrace decision"  # the ftrace trampoline's choice to redirect
    FTRACE_EXIT = "ftrace exit"          # the ftrace trampoline's way out (registers it restores)
    FTRACE_STUBS = "ftrace stubs"        # the out-of-line ftrace stubs
    RFC_PATH = "RFC path"                # the RFC's redirect path (P1)
    RFC_HELPER = "RFC helper"            # KLP_return_helper
    MODULE_LOADER = "module loader"      # the kernel's module relocations (TOC restores after calls)
    REPLACEMENT = "C"                    # the replacement function in the patch module


FTRACE_S = KERNELS["6.1"].ftrace_source
FTRACE_ENTRY_S = KERNELS["7.3"].ftrace_source
FTRACE_C = "arch/powerpc/kernel/trace/ftrace.c"
MODULE_LOADER_C = "arch/powerpc/kernel/module_64.c"
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
    mutated: MutatedCode
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
    Mutant("push-no-magic", MutatedCode.PUSH_HALF, "the push never stores the magic", 8,
           ((FTRACE_S, "\tori     r12, r12, STACK_END_MAGIC@l\n\tstd\tr12, -8(r11)\n",
             "\tori     r12, r12, STACK_END_MAGIC@l\n\tnop\n"),), "-t 1 -n 3 -k local"),
    Mutant("push-swapped-slots", MutatedCode.PUSH_HALF, "the push saves r2 in the RA slot and RA in the TOC slot", 9,
           ((FTRACE_S, "\tstd\tr2,  -24(r11)\n\tmflr\tr12\n\tstd\tr12, -16(r11)\n",
             "\tstd\tr2,  -16(r11)\n\tmflr\tr12\n\tstd\tr12, -24(r11)\n"),), "-t 1 -n 3 -k local"),
    Mutant("push-32-bytes", MutatedCode.PUSH_HALF, "the push allocates 32 bytes, the pop frees 24", 9,
           ((FTRACE_S, "\t/* Allocate 3 x 8 bytes */\n\tld\tr11, TI_livepatch_sp(r12)\n\taddi\tr11, r11, 24\n",
             "\t/* Allocate 3 x 8 bytes */\n\tld\tr11, TI_livepatch_sp(r12)\n\taddi\tr11, r11, 32\n"),),
           "-t 1 -n 3 -k local"),
    Mutant("pop-ra-from-toc-slot", MutatedCode.RETURN_HALF, "the pop loads LR from the TOC slot", 9,
           ((FTRACE_S, "\tld\tr12, -16(r11)\n\tmtlr\tr12\n", "\tld\tr12, -24(r11)\n\tmtlr\tr12\n"),),
           "-t 1 -n 3 -k local"),
    Mutant("pop-no-toc-restore", MutatedCode.RETURN_HALF, "the pop does not restore r2", 9,
           ((FTRACE_S, "\tld\tr2,  -24(r11)\n\n\t/* Pop livepatch stack frame */",
             "\tnop\n\n\t/* Pop livepatch stack frame */"),), "-t 1 -n 3 -k local"),
    Mutant("pop-16-bytes", MutatedCode.RETURN_HALF, "the pop frees 16 bytes of 24: silent, the stack creeps", 9,
           ((FTRACE_S, "\tsubi\tr11, r11, 24\n", "\tsubi\tr11, r11, 16\n"),), "-t 1 -n 3 -k local"),
    Mutant("pop-never", MutatedCode.RETURN_HALF, "the pop never stores livepatch_sp back", 9,
           ((FTRACE_S, "\tsubi\tr11, r11, 24\n\tstd\tr11, TI_livepatch_sp(r12)\n",
             "\tsubi\tr11, r11, 24\n\tnop\n"),), "-t 1 -n 3 -k local"),
    Mutant("ftrace-no-redirect", MutatedCode.FTRACE_DECISION, "ftrace_caller enters C directly, never through "
           "livepatch_handler", 7,
           ((FTRACE_S, "\tbne-\tlivepatch_handler\n#endif\n\tbctr\t\t\t/* jump after _mcount site */",
             "\tnop\n#endif\n\tbctr\t\t\t/* jump after _mcount site */"),), "-t 1 -n 3 -k local"),
    Mutant("rfc-fixed-compare-0x18", MutatedCode.RFC_PATH, "the compare constant built with li after lis (0x18)", 2,
           ((FTRACE_S, "\tlis\tr11, 0xe841\n\tori\tr11, r11, 0x18\n", "\tlis\tr11, 0xe841\n\tli\tr11, 0x18\n"),),
           "-t 1 -n 3 -k global", trampoline="rfc-fixed"),
    Mutant("rfc-fixed-helper-short-pop", MutatedCode.RFC_HELPER, "the helper pops 16 bytes of the 32-byte mini frame", 9,
           ((FTRACE_S, "\taddi\tr1, r1, 32\t\t/* pop first */\n", "\taddi\tr1, r1, 16\t\t/* pop first */\n"),),
           "-t 1 -n 3 -k local", trampoline="rfc-fixed"),
    Mutant("loader-no-toc-restore", MutatedCode.MODULE_LOADER, "calls to klp_lab_b_global keep their nop: A never "
           "reloads its TOC", 9,
           ((MODULE_LOADER_C, "\t\t\tif (!restore_r2(strtab + sym->st_name,",
             "\t\t\tif (strncmp(strtab + sym->st_name, \"klp_lab_b_\", 10) &&\n"
             "\t\t\t    !restore_r2(strtab + sym->st_name,"),), "-t 1 -n 3 -k global"),
    Mutant("c-clobbers-toc-slot", MutatedCode.REPLACEMENT, "C overwrites A's TOC save slot, as a tail call through a stub does", 3,
           ((PATCH_MODULE, "static noinline void new_body(unsigned long flags)\n{\n",
             "static noinline void new_body(unsigned long flags)\n{\n\tflags |= KLP_LAB_FAULT_TOC_SLOT;\n"),),
           "-t 1 -n 3 -k global"),
    # out-of-line ftrace stubs (7.x): invariant 14
    Mutant("ool-r15-clobbered", MutatedCode.FTRACE_EXIT, "ftrace_caller no longer puts A's r15 back: it keeps its own "
           "return address (into the stub) there", 14,
           ((FTRACE_ENTRY_S, "1:\tmtlr\tr3\n\t.if \\allregs == 0\n\tREST_GPR(15, r1)\n\t.endif\n",
             "1:\tmtlr\tr3\n"),), "-t 1 -n 3 -k local", kernel="7.3", handoff=True),
    Mutant("ool-handler-ra-from-lr", MutatedCode.PUSH_HALF, "livepatch_handler saves LR (C, with out-of-line stubs) as RA, "
           "as it did before them", 14,
           ((FTRACE_ENTRY_S, "\tstd\tr0, -16(r11)\n\tmflr\tr12\n",
             "\tmflr\tr12\n\tstd\tr12, -16(r11)\n"),), "-t 1 -n 3 -k local", kernel="7.3", handoff=True),
    Mutant("ool-stub-skips-an-instruction", MutatedCode.FTRACE_STUBS, "a module's out-of-line stubs return to the traced "
           "site + 8, past B's first instruction", 14,
           ((FTRACE_C, "rec->ip + MCOUNT_INSN_SIZE, 0))", "rec->ip + (mod ? 2 : 1) * MCOUNT_INSN_SIZE, 0))"),),
           "-t 1 -n 3 -k local", kernel="7.3"),
    Mutant("c-unbalanced", MutatedCode.REPLACEMENT, "C leaves livepatch_sp one entry higher", 10,
           ((PATCH_MODULE, "static noinline void new_body(unsigned long flags)\n{\n",
             "static noinline void new_body(unsigned long flags)\n{\n\tflags |= KLP_LAB_FAULT_UNBALANCED;\n"),),
           "-t 1 -n 3 -k local"),
)}
