"""A user's own ppc64le kernel in the lab: booted under the lab's QEMU with
the lab's initramfs (gdbklp lab boot|gdb|demo --vmlinux).

The kernel is asked what it has before anything boots (gdbklp.abi.vmlinux).
The lab's modules go into the initramfs only when they can be built for
this kernel, that is, against its build tree (--kernel-build).
"""

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from gdbklp.abi.elf import ElfError, read_modinfo
from gdbklp.abi.vmlinux import BOOT_REQUIREMENTS, WATCH_REQUIREMENTS, Vmlinux, module_release, read_vmlinux
from gdbklp.lab import LabError, build
from gdbklp.lab import config as cfg


@dataclass(frozen=True)
class OwnKernel:
    """The user's kernel: what boots, what gdb reads, where it was built."""

    vmlinux: Path
    debug_vmlinux: Path | None = None  # with DWARF; None: vmlinux has it
    build_dir: Path | None = None  # its build tree (O= directory), for modules


def examine(kernel: OwnKernel) -> Vmlinux:
    """The kernel read from its file; LabError, one line per missing piece,
    if it cannot boot in the lab."""
    for path in (kernel.vmlinux, kernel.debug_vmlinux):
        if path is not None and not Path(path).is_file():
            raise LabError(f"no kernel at {path}")
    try:
        found = read_vmlinux(kernel.vmlinux)
    except ElfError as e:
        raise LabError(f"cannot boot {kernel.vmlinux} in the lab: {e}") from None
    missing = found.missing(BOOT_REQUIREMENTS)
    if missing:
        raise LabError("\n".join(f"cannot boot {kernel.vmlinux} in the lab: it {line}" for line in missing))
    return found


def watch_gaps(found: Vmlinux) -> list[str]:
    """What this kernel lacks for klp-watch, one line each (klp-frames
    needs none of it)."""
    return [f"{found.path} {line}: klp-frames works, klp-watch will refuse"
            for line in found.missing(WATCH_REQUIREMENTS)]


def tree_key(build_dir: Path) -> str:
    """What a build tree holds, for the cache: its configuration, exported
    symbols and release (what a module build reads from it)."""
    names = (".config", "Module.symvers", "include/config/kernel.release")
    missing = [n for n in names if not (build_dir / n).is_file()]
    if missing:
        raise LabError(f"{build_dir} is not a built kernel tree (no {', '.join(missing)}: "
                       f"run make vmlinux modules there first)")
    return hashlib.sha256(json.dumps({n: build.sha256_file(build_dir / n) for n in names}).encode()).hexdigest()[:16]


def tree_binds(build_dir: Path) -> tuple[Path, ...]:
    """The directories a module build against build_dir reads: the tree and,
    for an O= build, the source tree its 'source' link names."""
    source = build_dir / "source"
    return (build_dir, source.resolve()) if source.is_symlink() else (build_dir,)


def check_module_for(ko: Path, found: Vmlinux) -> None:
    """LabError, in one line, unless ko is a module built for this kernel's release."""
    try:
        vermagic = read_modinfo(ko).get("vermagic", "?")
    except ElfError as e:
        raise LabError(str(e)) from None
    if found.release is None:
        raise LabError(f"{found.path} has no readable linux_banner: cannot tell which modules are built for it")
    if module_release(vermagic) != found.release:
        raise LabError(f"{ko} was built for {module_release(vermagic)}, the kernel {found.path} is "
                       f"{found.release}: build it with 'gdbklp lab build-module --kernel-build DIR'")


def lab_modules_for(kernel: OwnKernel, found: Vmlinux) -> build.StepResult | None:
    """The lab's modules built against the kernel's build tree; None without one."""
    if kernel.build_dir is None:
        return None
    tree = Path(kernel.build_dir).resolve()
    modules = build.build_modules_in(tree, tree_key(tree), "modules-own", replace(cfg.MODULES, from_kernel=()),
                                     binds=tree_binds(tree))
    check_module_for(modules / f"{cfg.MODULES.names[0]}.ko", found)
    return modules


def own_images(kernel: OwnKernel, extra_modules: tuple[Path, ...] = ()) -> build.LabImages:
    """Images that boot the user's kernel: the lab's initramfs with the
    lab's modules if they can be built for it, and extra_modules (each
    checked to be built for it)."""
    found = examine(kernel)
    for ko in extra_modules:
        check_module_for(ko, found)
    with build.cache_lock():
        modules = lab_modules_for(kernel, found)
        initramfs = build.build_initramfs(modules, extra_modules=tuple(extra_modules))
    return build.LabImages(
        vmlinux=Path(kernel.vmlinux).resolve(),
        initramfs=initramfs / "initramfs.cpio.gz",
        kernel_build=Path(kernel.build_dir).resolve() if kernel.build_dir else None,
        modules=modules.directory if modules else None,
        debug_vmlinux=Path(kernel.debug_vmlinux).resolve() if kernel.debug_vmlinux else None,
    )


def build_user_modules_in(source: Path, build_dir: Path) -> list[Path]:
    """Build the external modules in source against the user's kernel
    build tree, with the lab root's cross compiler; returns the .ko files."""
    source = Path(source).resolve()
    if not source.is_dir():
        raise LabError(f"{source} is not a directory of module sources")
    tree = Path(build_dir).resolve()
    tree_key(tree)  # refuses what is not a built tree, in one line
    with build.cache_lock():
        build.log(f"building the modules in {source} against {tree}")
        build.run(build.make_cmd(cfg.KERNEL, "-C", str(tree), f"M={source}", "modules"),
                  binds=(source, *tree_binds(tree)))
    return sorted(source.glob("*.ko"))
