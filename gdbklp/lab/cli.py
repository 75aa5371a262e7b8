"""gdbklp lab subcommands: build, boot, gdb, demo."""

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gdbklp.lab import LabError, build, host, ownkernel, session, workload
from gdbklp.lab import root as labroot
from gdbklp.lab.config import (DEFAULT_KERNEL, DEFAULT_TRAMPOLINE, KERNELS, OTHER_RELEASE_ROOTS, QEMUS, REPO_ROOT,
                               TRAMPOLINES)
from gdbklp.gdbinit import loader_file
from gdbklp.lab.qemu import Guest, emulator, kernel_cmdline
from gdbklp.options import WatchOptions
from gdbklp.ports import port_number, require_listener


def lab_emulator(args):
    """The QEMU the command runs, said before it starts: with --record, the
    recorder's (the one whose plugin API the recorder is built for)."""
    which = args.qemu
    if getattr(args, "record", False):
        if which not in (None, "record"):
            raise LabError(f"--record needs the recorder's QEMU (--qemu record), not --qemu {which}")
        which = "record"
    chosen = emulator(which)
    print(f"qemu: {chosen.describe()}", flush=True)
    return chosen


def recorder_socket(args) -> Path | None:
    """Where the recorder plugin listens, with --record (in a directory of its own)."""
    return Path(tempfile.mkdtemp(prefix="gdbklp-recorder-")) / "recorder.sock" if args.record else None


def watch_options(args, socket: Path | None) -> WatchOptions:
    """The demo's klp-watch options: P1 unless --without-p1, the recorder with --record."""
    return WatchOptions(resolve_indirect=not args.without_p1, handoff=getattr(args, "handoff", False),
                        record=str(socket) if socket else None)


def lab_images(args, extra_modules: tuple[Path, ...] = ()) -> build.LabImages:
    """The chosen kernel's images (with extra_modules in the initramfs),
    built or verified: the user's own kernel with --vmlinux, else a lab
    generation; a trampoline the generation does not have is refused
    before anything is built."""
    trampoline = getattr(args, "trampoline", None)
    if getattr(args, "vmlinux", None):
        if args.kernel or trampoline not in (None, DEFAULT_TRAMPOLINE):
            raise LabError("--vmlinux boots your own kernel: --kernel and --trampoline choose lab kernels")
        return ownkernel.own_images(ownkernel.OwnKernel(args.vmlinux, args.debug_vmlinux, args.kernel_build),
                                    extra_modules)
    if getattr(args, "debug_vmlinux", None) or getattr(args, "kernel_build", None):
        raise LabError("--debug-vmlinux and --kernel-build describe your own kernel: give --vmlinux too")
    kernel = KERNELS[args.kernel or DEFAULT_KERNEL]
    if trampoline and trampoline not in kernel.trampolines:
        raise LabError(f"the {kernel.name} lab has no {trampoline} trampoline "
                       f"(it has: {', '.join(kernel.trampolines)})")
    return build.build_all(kernel=kernel.name, extra_modules=extra_modules)


def say_watch_gaps(images: build.LabImages) -> list[str]:
    """Print what an own kernel lacks for klp-watch (one line each) and return it."""
    if images.kernel is not None:
        return []
    gaps = ownkernel.watch_gaps(ownkernel.examine(ownkernel.OwnKernel(images.vmlinux)))
    for line in gaps:
        print(f"note: {line}", flush=True)
    return gaps


def cmd_build(args) -> int:
    images = lab_images(args)
    print(f"kernel: {images.kernel.name} ({images.kernel.summary})")
    for name, path in vars(images).items():
        if name != "kernel":
            print(f"{name}: {path}")
    print(f"build your patch modules with: gdbklp lab build-module --kernel {images.kernel.name} DIRECTORY "
          f"(make -C {images.kernel_build} ARCH={images.kernel.arch} "
          f"CROSS_COMPILE={images.kernel.cross_compile} M=DIRECTORY modules, in the lab root)")
    print(f"lab root: {labroot.ensure_root()}")
    for which in QEMUS:
        chosen = emulator(which)
        print(f"qemu ({which}): {chosen.describe()}")
        if chosen.plugin:
            print(f"recorder plugin, for that QEMU: -plugin {chosen.plugin},socket=PATH")
    return 0


def gdb_command(vmlinux, port: int) -> list[str]:
    return ["gdb-multiarch", "-q", "-x", str(loader_file()), "-ex", f"file {vmlinux}",
            "-ex", f"target remote 127.0.0.1:{port}"]


def cmd_boot(args) -> int:
    images = lab_images(args)
    say_watch_gaps(images)
    socket = recorder_socket(args)
    guest = Guest(images.vmlinux, images.initramfs, smp=args.smp, stopped=args.stopped,
                  emulator=lab_emulator(args), plugin_socket=socket,
                  append=kernel_cmdline(mode=args.mode, patch=not args.no_patch, run_args=args.workload,
                                        trampoline=args.trampoline))
    with guest.start():
        print(f"gdbstub: 127.0.0.1:{guest.gdb_port}   serial log: {guest.serial_log}")
        if socket:
            print(f"recorder: klp-watch start --record {socket}")
        print("attach with: " + shlex.join(gdb_command(images.symbols, guest.gdb_port)))
        if not args.stopped:
            guest.wait_ready(120)
            print("guest ready; Ctrl-C stops it")
        while guest.running:
            time.sleep(0.5)
    return 0


def cmd_gdb(args) -> int:
    port = port_number(args.port) if args.port else None
    if port:  # before anything is built: a wrong port is said at once
        require_listener("127.0.0.1", port)
    images = lab_images(args)
    say_watch_gaps(images)
    if port:
        return subprocess.call(gdb_command(images.symbols, port))
    socket = recorder_socket(args)
    with session.booted(images, smp=args.smp, trampoline=args.trampoline, emulator=lab_emulator(args),
                        plugin_socket=socket) as guest:
        print(f"guest booted (serial log: {guest.serial_log}); starting gdb", file=sys.stderr)
        if socket:
            print(f"recorder: klp-watch start --record {socket}", file=sys.stderr)
        return subprocess.call(gdb_command(images.symbols, guest.gdb_port))


def cmd_build_module(args) -> int:
    if args.kernel_build:
        if args.kernel:
            raise LabError("--kernel-build builds against your own kernel's tree: --kernel chooses a lab kernel")
        built = ownkernel.build_user_modules_in(args.directory, args.kernel_build)
    else:
        built = build.build_user_modules(args.directory, args.kernel or DEFAULT_KERNEL)
    for ko in built:
        print(ko)
    return 0


def cmd_own_patch(args) -> int:
    """demo --module/--run: the user's patch modules loaded into the lab guest
    (the lab's own patch stays out), the command run under klp-watch."""
    modules = tuple(Path(m).resolve() for m in args.module)
    for ko in modules:
        if not ko.is_file():
            raise LabError(f"no module at {ko}")
    images = lab_images(args, modules)
    command = " && ".join([*(f"insmod /lib/modules/extra/{ko.name}" for ko in modules),
                           "klplab_settle", args.run or "klplab-run -t 1 -n 5"])
    qemu = lab_emulator(args)
    if say_watch_gaps(images):
        raise LabError(f"{images.vmlinux} cannot be watched (above)")
    patches = ", ".join(ko.name for ko in modules) or "the lab patch"
    print(f"booting {images.name} ({images.vmlinux}) with {patches} ...", flush=True)
    socket = recorder_socket(args)
    with session.booted(images, patch=not modules, smp=args.smp, trampoline=args.trampoline, emulator=qemu,
                        plugin_socket=socket) as guest:
        with session.attached(guest, images.symbols) as gdb:
            print(f"gdb attached; watching '{command}' ...", flush=True)
            watched = session.WatchedGuest(guest, gdb)
            report = watched.watch(command, args.timeout or 1800.0, watch_options(args, socket))
    print(watched.last_output.rstrip())
    print()
    print(report.format_text())
    if args.report:
        report.write_json(args.report)
        print(f"report: {args.report}")
    clean = not (report.violations or report.errors or report.guest_events)
    return 0 if clean and watched.last_status == 0 else 1


def cmd_demo(args) -> int:
    if args.module or args.run:
        return cmd_own_patch(args)
    images = lab_images(args)
    if say_watch_gaps(images):
        raise LabError(f"{images.vmlinux} cannot be watched (above)")
    if images.modules is None:
        raise LabError(f"the demo's workload needs the lab's modules built for {images.vmlinux}: give its build "
                       f"tree with --kernel-build DIR, or your own patch with --module and --run")
    trampoline = TRAMPOLINES[args.trampoline or DEFAULT_TRAMPOLINE]
    kinds = args.kinds or ",".join(trampoline.kinds)
    run_args = f"-t {args.tasks} -n {args.calls} -k {kinds}"
    if args.flags:
        run_args += f" -f {args.flags}"
    qemu = lab_emulator(args)
    print(f"booting {images.name} ({images.vmlinux.parent.name}; trampoline: {trampoline.summary}) ...", flush=True)
    socket = recorder_socket(args)
    with session.booted(images, smp=args.smp, trampoline=trampoline.name, emulator=qemu, plugin_socket=socket) as guest:
        print(f"guest ready; serial log: {guest.serial_log}")
        with session.attached(guest, images.symbols) as gdb:
            print(f"gdb attached; watching 'klplab-run {run_args}' ...", flush=True)
            start = time.monotonic()
            try:
                report, counts = session.watch_workload(guest, gdb, run_args,
                                                        timeout=args.timeout or trampoline.demo_timeout,
                                                        options=watch_options(args, socket))
            except session.WorkloadError as e:  # the guest went down or hung: what the watch saw still counts
                print(f"\n{e.report.format_text()}\n\nthe workload did not finish: no counts from the guest")
                return 1
            elapsed = time.monotonic() - start
    print()
    print(report.format_text())
    print()
    rows = workload.compare(report.by_caller, counts)
    print(workload.format_comparison(rows))
    ok = all(r.agrees for r in rows) and not report.errors and not report.violations
    rate = report.redirections / elapsed if elapsed else 0
    agreement = "every kind agrees with the guest" if all(r.agrees for r in rows) else \
        "MISMATCH between gdb and the guest"
    print(f"\n{report.redirections} redirections watched in {elapsed:.1f} s ({rate:.0f}/s); "
          f"{len(report.violations)} violations; {agreement}")
    if args.report:
        report.write_json(args.report)
        print(f"report: {args.report}")
    return 0 if ok else 1


def cmd_other_release(args) -> int:
    """Run a command in a root of the other supported Debian release, on this
    checkout and this lab cache, with a venv of its own (.venv-SUITE)."""
    codename = host.os_release().get("VERSION_CODENAME", "")
    spec = OTHER_RELEASE_ROOTS.get(codename)
    if spec is None:
        raise LabError(f"no other release is known for a {codename or 'non-Debian'} host "
                       f"(one of {', '.join(OTHER_RELEASE_ROOTS)})")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError("other-release: say which command to run (after --)")
    print(f"[lab] in a Debian {spec.suite} root: {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(labroot.wrap(["env", f"GDBKLP_VENV=.venv-{spec.suite}", *command],
                                        REPO_ROOT, spec=spec, settings=True))


def add_kernel_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kernel", choices=tuple(KERNELS), default=None,
                        help="the lab kernel generation: " + "; ".join(
                            f"{k.name}: {k.summary}" for k in KERNELS.values()) + f" (default {DEFAULT_KERNEL})")


def add_own_kernel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vmlinux", type=Path, metavar="PATH",
                        help="boot your own ppc64le kernel (pseries, hvc console, initramfs support) instead of a "
                             "lab kernel, with the lab's initramfs")
    parser.add_argument("--debug-vmlinux", type=Path, metavar="PATH",
                        help="the same kernel with its DWARF, for gdb (default: --vmlinux)")
    parser.add_argument("--kernel-build", type=Path, metavar="DIR",
                        help="your kernel's build tree: the lab's modules (and the demo's workload) are built "
                             "against it")


def add_guest_options(parser: argparse.ArgumentParser) -> None:
    add_kernel_option(parser)
    add_own_kernel_options(parser)
    parser.add_argument("--trampoline", choices=tuple(TRAMPOLINES), default=DEFAULT_TRAMPOLINE,
                        help="; ".join(f"{t.name}: {t.summary}" for t in TRAMPOLINES.values()))
    parser.add_argument("--record", action="store_true",
                        help="load QEMU's gdbklp recorder plugin (the recorder's QEMU), so that klp-watch start "
                             "--record checks every redirection with no stop (the demo watches so)")
    parser.add_argument("--qemu", choices=tuple(QEMUS), default=None,
                        help="; ".join(f"{name}: {what}" for name, what in QEMUS.items())
                        + " (default: $GDBKLP_QEMU, else lab)")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", required=True)
    p = sub.add_parser("build", help="build (or verify the cached) kernel, modules and initramfs")
    add_kernel_option(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("boot", help="boot the lab guest and wait (Ctrl-C stops it)")
    p.add_argument("--smp", type=int, default=None, help="vCPUs (default 2)")
    p.add_argument("-S", "--stopped", action="store_true", help="wait for gdb before starting")
    p.add_argument("--mode", choices=("serve", "run", "shell"), default="serve",
                   help="serve: the guest's /init runs the lines sent on its console (what the demo and the "
                        "tests use); run: it runs klplab-run with --workload's arguments, then powers off; shell: an "
                        "interactive shell on the console (default serve)")
    p.add_argument("--workload", default="", metavar="ARGS", help="klplab-run arguments (mode run)")
    p.add_argument("--no-patch", action="store_true", help="do not load the live patch at boot")
    add_guest_options(p)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("gdb", help="gdb-multiarch with gdbklp, attached to a new or running guest")
    p.add_argument("--port", help="attach to a guest whose gdbstub already listens on 127.0.0.1:PORT")
    p.add_argument("--smp", type=int, default=None, help="vCPUs (default 2)")
    add_guest_options(p)
    p.set_defaults(func=cmd_gdb)

    p = sub.add_parser("demo", help="watch every call kind's redirections and compare with the guest")
    p.add_argument("--tasks", type=int, default=2, help="guest tasks calling through the patch (default 2)")
    p.add_argument("--calls", type=int, default=20, help="calls per kind per task")
    p.add_argument("--kinds", help="comma-separated kinds, or all (default: those the trampoline handles)")
    p.add_argument("--timeout", type=float, help="seconds the workload may take (default: per trampoline)")
    p.add_argument("--flags", default="", help="yield,sleep,hold")
    p.add_argument("--smp", type=int, default=None, help="vCPUs (default 2)")
    p.add_argument("--report", metavar="FILE", help="also write the watch report as JSON")
    p.add_argument("--without-p1", action="store_true",
                   help="one stop per redirection, not two: indirect calls' B and C are then named only "
                        "where the patch's functions or C's code tell (the lab's: not)")
    p.add_argument("--handoff", action="store_true",
                   help="with --module/--run: also check ftrace's hand-off to livepatch_handler (klp-watch "
                        "--handoff, invariant 14)")
    p.add_argument("--module", action="append", default=[], metavar="PATH.ko",
                   help="your own live-patch module, built against the lab kernel (gdbklp lab build-module): "
                        "loaded instead of the lab's patch, then --run is watched (repeatable)")
    p.add_argument("--run", metavar="CMD", help="the guest shell command to watch (default with --module: "
                                               "klplab-run -t 1 -n 5, every call kind)")
    add_guest_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build-module", help="build your module sources against a lab kernel, with the lab "
                                            "root's cross compiler (make -C BUILD M=DIRECTORY modules)")
    p.add_argument("directory", type=Path, help="the module's sources, with a Kbuild or Makefile")
    add_kernel_option(p)
    p.add_argument("--kernel-build", type=Path, metavar="DIR",
                   help="build against your own kernel's build tree instead of a lab kernel")
    p.set_defaults(func=cmd_build_module)

    p = sub.add_parser("other-release", help="run a command on this checkout in a root of the other supported "
                       "Debian release (on Debian 12: the lab root, Debian 13; on Debian 13: Debian 12)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]")
    p.set_defaults(func=cmd_other_release)
