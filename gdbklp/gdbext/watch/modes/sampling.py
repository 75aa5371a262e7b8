"""klp-watch --sample HZ: no breakpoints; pause the guest by interrupt, validate, resume.

A pause by interrupt does not flush QEMU 7.2's translation cache (a
breakpoint stop does), so a sample costs the guest only the time gdb holds
it. One sample checks the task on each vCPU that runs kernel code and
more tasks taken in turn from the task list, with SLEEPER_SHARE of the
guest's time (about 8 tasks a second on the lab), so that the cost of
sampling stays what its rate makes it:

- invariant 10: livepatch_sp between the stack's first slot and the task's
  r1, on an entry boundary; the stack-end magic intact;
- invariants 7 and 8: each livepatch-stack entry a [TOC, RA, magic] record
  whose RA follows a call and whose TOC belongs to the caller's object
  (a local caller) or to some object (global and indirect callers), with the
  magic intact;
- invariant 12, the consistency model's stack rule: while a patch is in
  transition, a task already switched has none of the functions being
  replaced on its stack (the stacks of switched tasks are walked); between
  transitions, no sleeping task has an old function of an enabled patch on
  its stack (the stacks of the sleepers checked are walked, the used part of
  each in one read).

It catches corruption that persists until a sample looks, not each event;
the redirection-time invariants (1, 3, 9, and 12 at each call) need the
precise mode's breakpoints or parking. Sampling needs background execution
(see gdbklp.gdbext.watch.modes.pauses).
"""

import time

import gdb

from gdbklp.abi import ppc
from gdbklp.abi.frames import Registers, prefetching_reader, walk_stack
from gdbklp.abi.invariants import (
    SAMPLE,
    Violation,
    check_balance,
    check_settled_task,
    check_switched_task,
    replaced_on_stack,
    stamp,
)
from gdbklp.abi.livepatch import read_livepatch_stack
from gdbklp.gdbext.inferior import patches, stacks, target, tasks, vcpus
from gdbklp.gdbext.watch.modes.pauses import PeriodicPauses
from gdbklp.options import Mode

SLEEPER_SHARE = 0.02  # of the guest's time, spent checking tasks that are not on a vCPU
TASK_LIST_SECONDS = 10.0  # between two readings of the task list (a slow walk of DWARF lists)


def handler_span(layout, code: bytes) -> range:
    """livepatch_handler's addresses, from its entry to the blr of its return half."""
    words = ppc.words(code)
    first = (layout.return_point - layout.address) // 4
    ends = [i for i in range(first, len(words)) if words[i] == ppc.BLR]
    return range(layout.address, layout.address + 4 * (ends[0] + 1 if ends else len(words)))


class Sampler(PeriodicPauses):
    """The sampling mode of a watch (see the module's docstring)."""

    mode = Mode.SAMPLE

    def __init__(self, watch):
        super().__init__(watch, 1.0 / watch.options.sample)
        self.reporter = watch.reporter
        self.kernel = watch.kernel
        self.layout = watch.layout
        self.sleeper_budget = 0.0  # seconds: each sample adds SLEEPER_SHARE of its period, checks spend it
        self.modules_read_at = 0.0
        self.tasks_read_at = time.monotonic()
        self.samples = 0
        self.keep_stopped = False  # --fail-fast: a sample found a violation
        self.tasks: list[int] = []
        self.next_task = 0
        self.stacks: dict[int, int | None] = {}  # task -> task->stack, as last read
        self.can_check_sleepers = target.dwarf_offset(tasks.TASK, "thread.ksp") is not None
        self.transition: tuple[int, int, set[str]] | None = None  # (patch, target state, replaced functions)
        self._old_functions: tuple[list | None, set[str]] = (None, set())
        self.patches_checked_in = -1  # the sample that last read the patch list
        self.patches_head = self.kernel.symbols.address("klp_patches")
        self.patch_list_offset = target.dwarf_offset("struct klp_patch", "list")
        self.patch_enabled_offset = target.dwarf_offset("struct klp_patch", "enabled")
        self.switch_pc = self.kernel.symbols.address("_switch") or 0  # where a sleeping task resumes
        # a task running livepatch_handler itself is between a push and C's
        # frame, or between C's return and the pop: its balance is in flux
        self.handler_span = handler_span(self.layout, watch.handler_code)

    def arm(self) -> str:
        if self.can_check_sleepers and gdb.selected_thread() is not None:
            self.tasks = tasks.all_tasks()  # the slow readings now, not in the first pause
            self.kernel.view()
        self.start_pauses()
        return f"sampling at {self.watch.options.sample:g} Hz (pauses by interrupt, no breakpoints)"

    # ---- one sample ------------------------------------------------------------

    def on_pause(self) -> bool:
        self.keep_stopped = False
        self.sample()
        return self.keep_stopped

    def sample(self) -> None:
        running = []
        kernel_vcpu = None
        for thread in vcpus.select_each(self.vcpus):
            state = vcpus.vcpu_state()
            # at an exception's first instructions r1 and r13 may still be the user's
            if not vcpus.in_user_mode(state):
                kernel_vcpu = thread  # the read goes through this vCPU's MMU context
                task = tasks.running_task(self.kernel, state["r13"])
                running.append((task, state, thread.num - 1))
        if kernel_vcpu is None:  # no vCPU in the kernel: its memory is not readable now
            return
        if gdb.selected_thread().num != kernel_vcpu.num:
            kernel_vcpu.switch()
        self.samples += 1
        self.reporter.report.samples = self.samples
        self.read_transition()
        for task, state, cpu in running:
            sp = state["r1"]
            own = self.stack_of(task, sp)
            if own is None:
                own = sp & ~(self.watch.thread_size - 1)
            if not own <= sp < own + self.watch.thread_size:  # on an interrupt stack: no bound from r1
                sp = own + self.watch.thread_size
            self.check(task, own, sp, cpu, state)
        # a task running user code is no sleeper: what _switch left on its stack is stale
        on_vcpus = set(tasks.on_cpus(self.kernel, len(self.vcpus)))
        self.check_sleepers({t for t, _, _ in running} | on_vcpus)

    def stack_of(self, task: int, sp: int) -> int | None:
        """task->stack, read again only when sp is not inside the stack read
        last time (the task runs on an interrupt stack, or its task_struct now
        belongs to a new task): a task keeps its stack for life."""
        base = self.stacks.get(task)
        if base is None or not base <= sp < base + self.watch.thread_size:
            base = self.stacks[task] = tasks.task_stack(task)
        return base

    def read_transition(self) -> None:
        """The transition in progress, if any: its functions are read once per transition."""
        patch = patches.transition_patch() if self.watch.consistency else 0
        if not patch:
            self.transition = None
        elif self.transition is None or self.transition[0] != patch:
            _, goal, replaced = patches.transition_in_progress(self.kernel)
            self.transition = (patch, goal, replaced)

    def check_stack_rule(self, task: int, functions, vcpu_state: dict | None) -> Violation | None:
        """Invariant 12 on the task's stack (functions(): those on it): in a
        transition for a switched task, between transitions for a sleeper."""
        if self.transition:
            _, goal, replaced = self.transition
            state = patches.patch_state(task)
            if state != goal:
                return None  # pending: it may hold anything
            return check_switched_task(state, goal, replaced_on_stack(functions(), replaced))
        if vcpu_state is not None or None in (self.patches_head, self.patch_list_offset, self.patch_enabled_offset):
            return None
        old = self.old_functions()
        return check_settled_task(replaced_on_stack(functions(), old)) if old else None

    def walk(self, base: int, sp: int, entries, vcpu_state: dict | None):
        """A task's stack walked: a running task's from its vCPU, a sleeper's from _switch."""
        if vcpu_state:
            regs = stacks.registers(vcpu_state)
        else:
            regs = Registers(pc=self.switch_pc, sp=sp)
        top = base + self.watch.thread_size
        read = prefetching_reader(target.read_memory, sp, top) if base <= sp < top else target.read_memory
        return walk_stack(regs, read, self.view(), base if base <= regs.sp < top else regs.sp & -self.watch.thread_size,
                          entries)

    def old_functions(self) -> set[str]:
        """The functions enabled patches replace, by name; read again when a patch
        comes, goes, or is switched on or off (one read per patch tells, once
        per sample)."""
        if self.patches_checked_in == self.samples:
            return self._old_functions[1]
        self.patches_checked_in = self.samples
        signature, head = [], self.patches_head
        node = target.read_u64(head)
        while node != head and len(signature) < 64:
            patch = node - self.patch_list_offset
            signature.append((patch, target.read_memory(patch + self.patch_enabled_offset, 1)))
            node = target.read_u64(node)
        if self._old_functions[0] != signature:
            self._old_functions = (signature, patches.enabled_old_functions(self.kernel))
        return self._old_functions[1]

    def view(self):
        """The kernel view; the module list (one read per module) is checked once a second at most."""
        now = time.monotonic()
        fresh = now - self.modules_read_at > 1.0
        if fresh:
            self.modules_read_at = now
        return self.kernel.view(read_modules=fresh)

    def check_sleepers(self, running: set[int]) -> None:
        """Tasks not on a vCPU, in turn from the task list, while the budget
        lasts: a check that overruns it is paid back by the next samples, so
        sleepers cost the guest SLEEPER_SHARE of its time at any rate."""
        if not self.can_check_sleepers:
            return
        if not self.tasks or time.monotonic() - self.tasks_read_at > TASK_LIST_SECONDS:
            self.tasks, self.tasks_read_at = tasks.all_tasks(), time.monotonic()
            self.stacks = {task: self.stacks[task] for task in self.tasks if task in self.stacks}
        share = SLEEPER_SHARE * self.period
        self.sleeper_budget = min(self.sleeper_budget + share, share)
        start = time.monotonic()
        for _ in range(len(self.tasks)):
            if time.monotonic() - start >= self.sleeper_budget:
                break
            self.next_task = (self.next_task + 1) % len(self.tasks)
            task = self.tasks[self.next_task]
            if task not in running:
                sp = tasks.saved_sp(task)
                self.check(task, self.stack_of(task, sp), sp, -1)
        self.sleeper_budget -= time.monotonic() - start

    def check(self, task: int, base: int, sp: int, cpu: int, vcpu_state: dict | None = None) -> None:
        """One task: its livepatch stack (in place, balanced, each entry sound), and
        the consistency model's stack rule."""
        livepatch_sp = target.read_u64(task + self.layout.ti_livepatch_sp)
        stack = read_livepatch_stack(target.read_memory, base, livepatch_sp, sp, self.layout, self.view())
        sampled = self.reporter.report.sampled_tasks
        sampled[task] = sampled.get(task, 0) + 1
        walked = []

        def walk():
            if not walked:
                walked.append(self.walk(base, sp, stack.entries, vcpu_state))
            return walked[0]

        violations = [Violation(10, "livepatch stack out of place (seen by a sample)",
                                "end_of_stack + 8 <= livepatch_sp <= r1, on an entry boundary, stack-end magic "
                                "intact", problem) for problem in stack.problems]
        stale: set[int] = set()
        in_handler = vcpu_state is not None and vcpu_state["pc"] in self.handler_span
        if stack.entries and base <= sp < base + self.watch.thread_size and not in_handler:  # the whole own stack
            violation, stale = check_balance(stack.entries, walk(), SAMPLE)
            violations += [violation] if violation else []
        for address, problems in stack.entry_problems.items():
            for problem in problems if address not in stale else ():
                inv = 8 if problem.startswith("magic") else 7
                violations.append(Violation(inv, "livepatch stack entry damaged (seen by a sample)",
                                            f"a [TOC, RA, magic] record at {address:#x}", problem))
        violation = self.check_stack_rule(task, lambda: [f.function for f in walk().frames], vcpu_state)
        if violation:
            violations.append(violation)
        if violations:
            who = tasks.identity(task)
            stamp(violations, self.reporter.context(who, cpu, call_site=SAMPLE))
            self.keep_stopped |= self.reporter.violations(who, violations)
