"""Cached, incremental build of the lab: kernel, modules, initramfs.

Each step's output directory is named after a hash of everything that goes
into it (source files, configuration, the previous step's key, tool
versions). A step is complete when its manifest exists and every output
still has the recorded SHA-256: a missing or corrupt output is rebuilt, not
trusted. A no-change rebuild therefore only hashes files.
"""

import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gdbklp.abi.elf import ElfError, read_modinfo
from gdbklp.lab import LabError, log
from gdbklp.lab import config as cfg
from gdbklp.lab import root as labroot
from gdbklp.lab.host import check_host
from gdbklp.lab.mutants import Mutant

MANIFEST = "manifest.json"
EDITED = ".edited"  # in a source tree while a variant's edits are applied to it


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_cached(path: Path) -> str:
    """SHA-256 of a large, rarely changing file, remembered by size and mtime."""
    st = path.stat()
    stamp = cfg.cache_root() / "hashes" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    ident = f"{st.st_size} {st.st_mtime_ns}"
    try:
        saved_ident, digest = stamp.read_text().split("\n")[:2]
        if saved_ident == ident:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(f"{ident}\n{digest}\n")
    return digest


def tool_version(command: str) -> str:
    """The first --version line of one of the lab root's tools."""
    out = subprocess.run(labroot.wrap([command, "--version"]), capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else ""


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StepResult:
    directory: Path
    key: str
    rebuilt: bool

    def __truediv__(self, name: str) -> Path:
        return self.directory / name


def cached_step(name: str, parts: dict, outputs: tuple[str, ...], build) -> StepResult:
    """Run build(directory) unless a verified result for these inputs exists.

    outputs are paths relative to the step's directory; their hashes are
    recorded in the manifest and checked on every reuse.
    """
    key = key_of(parts)
    directory = cfg.cache_root() / f"{name}-{key}"
    manifest = directory / MANIFEST
    if manifest.exists():
        try:
            recorded = json.loads(manifest.read_text())["outputs"]
            if set(recorded) == set(outputs) and all(
                sha256_file(directory / out) == digest for out, digest in recorded.items()
            ):
                return StepResult(directory, key, rebuilt=False)
            log(f"{name}: cached result {directory} is corrupt, rebuilding")
        except (OSError, ValueError, KeyError):
            log(f"{name}: cached manifest {manifest} is unreadable, rebuilding")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    start = time.monotonic()
    log(f"{name}: building in {directory}")
    build(directory)
    digests = {out: sha256_file(directory / out) for out in outputs}
    manifest.write_text(json.dumps({"inputs": parts, "outputs": digests}, indent=1))
    log(f"{name}: built in {time.monotonic() - start:.0f} s")
    return StepResult(directory, key, rebuilt=True)


def run(cmd: list, cwd=None, log_file: Path | None = None, binds=()) -> str:
    """Run a build command in the lab root (binds: more directories it may
    use, at their own paths); return its output, or raise LabError with the
    output's tail if it fails."""
    argv = labroot.wrap(cmd, cwd, binds=binds)
    if log_file is None:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
    else:
        with open(log_file, "w") as f:
            proc = subprocess.run(argv, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        output = log_file.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise LabError(f"'{' '.join(map(str, cmd))}' failed ({proc.returncode}):\n{tail}")
    return output


# ---- kernel -------------------------------------------------------------


def read_fragment(path: Path) -> dict[str, str]:
    """CONFIG_X=value lines of a Kconfig fragment ('# CONFIG_X is not set' = 'n')."""
    values = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            values[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            values[line[2:].split()[0]] = "n"
    return values


def apply_fragment(config: Path, fragment: dict[str, str]) -> None:
    """Replace or add the fragment's symbols in a .config."""
    kept = []
    for line in config.read_text().splitlines():
        name = line[2:].split()[0] if line.startswith("# CONFIG_") else line.partition("=")[0]
        if name not in fragment:
            kept.append(line)
    for name, value in fragment.items():
        kept.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    config.write_text("\n".join(kept) + "\n")


def unmet_fragment_lines(config: Path, fragment: dict[str, str]) -> list[str]:
    """Fragment lines the final .config does not honour (Kconfig dropped them)."""
    final = read_fragment(config)
    return [
        f"{name}={want} (got {final.get(name, 'n')})"
        for name, want in fragment.items()
        if final.get(name, "n") != want
    ]


def kernel_source(kernel: cfg.KernelConfig = cfg.KERNEL) -> tuple[Path, str]:
    """Extract the Debian kernel source and apply the lab's patches, once per
    tarball and patch set; return (tree, digest of tarball and patches)."""
    tarball = fetch_member(kernel.source)
    digest = sha256_cached(tarball)
    patches = [sha256_file(p) for p in kernel.patches]
    if patches:
        digest = hashlib.sha256(json.dumps([digest, patches]).encode()).hexdigest()
    root = cfg.cache_root() / "src" / digest[:16]
    done = root / ".extracted"
    if (root / EDITED).exists():  # a variant build was interrupted while its edits were in the tree
        log(f"{root} was left edited by a variant build: extracting it again")
        done.unlink(missing_ok=True)
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        log(f"extracting {tarball.name}")
        run(["tar", "xf", str(tarball), "-C", str(root)])
        for patch in kernel.patches:
            log(f"applying {patch.name}")
            run(["patch", "-p1", "--quiet", "--forward", "-i", str(patch)], cwd=single_tree(root, kernel))
        done.touch()
    return single_tree(root, kernel), digest


def single_tree(root: Path, kernel: cfg.KernelConfig) -> Path:
    trees = [p for p in root.iterdir() if p.is_dir()]
    if len(trees) != 1:
        raise LabError(f"{kernel.source.member} did not unpack to one directory")
    return trees[0]


def make_cmd(kernel: cfg.KernelConfig, *args) -> list[str]:
    jobs = str((os.cpu_count() or 1) + 1)
    return ["make", f"-j{jobs}", f"ARCH={kernel.arch}", f"CROSS_COMPILE={kernel.cross_compile}", *args]


def read_fragments(kernel: cfg.KernelConfig) -> dict[str, str]:
    """The generation's fragments merged in order (a later line wins)."""
    merged: dict[str, str] = {}
    for path in kernel.fragments:
        merged.update(read_fragment(path))
    return merged


def build_kernel(kernel: cfg.KernelConfig = cfg.KERNEL) -> StepResult:
    """Configure and build vmlinux; the build tree stays for module builds."""
    source, tarball_digest = kernel_source(kernel)
    fragment = read_fragments(kernel)
    parts = {
        "tarball": tarball_digest,
        "fragment": fragment,
        "base": kernel.base_configs,
        "targets": kernel.build_targets,
        "cc": tool_version(kernel.cross_compile + "gcc"),
    }

    def build(out: Path) -> None:
        obj = out / "build"
        make = lambda *a: make_cmd(kernel, f"O={obj}", *a)
        for target in kernel.base_configs:
            run(make(target), cwd=source)
        apply_fragment(obj / ".config", fragment)
        run(make("olddefconfig"), cwd=source)
        unmet = unmet_fragment_lines(obj / ".config", fragment)
        if unmet:
            raise LabError(f"kernel config fragment not honoured: {'; '.join(unmet)}")
        run(make(*kernel.build_targets), cwd=source, log_file=out / "build.log")
        os.link(obj / "vmlinux", out / "vmlinux")

    return cached_step(f"kernel-{kernel.name}", parts, ("vmlinux", "build/.config"), build)


def apply_edits(tree: Path, edits) -> dict[Path, tuple[bytes, os.stat_result]]:
    """Apply (path, text, replacement) edits to files under tree; each text must
    occur exactly once. Returns what the files were, for restore_files."""
    originals = {}
    for path, old, new in edits:
        f = tree / path
        if f not in originals:
            originals[f] = (f.read_bytes(), f.stat())
        text = f.read_text()
        if text.count(old) != 1:
            raise LabError(f"edit of {path}: the text to replace occurs {text.count(old)} times, not once: {old!r}")
        f.write_text(text.replace(old, new))
    return originals


def restore_files(originals: dict[Path, tuple[bytes, os.stat_result]]) -> None:
    """Put files back as they were, content and modification time (make must
    not see a change in the tree the lab's own build uses)."""
    for f, (data, st) in originals.items():
        f.write_bytes(data)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


@contextlib.contextmanager
def edited_source(source: Path, edits):
    """The kernel source tree with edits applied, restored on exit; a marker
    makes kernel_source() extract it again if the restore never happens."""
    marker = source.parent / EDITED
    marker.write_text(json.dumps(edits))
    originals = {}
    try:
        originals = apply_edits(source, edits)
        yield
    finally:
        restore_files(originals)
        marker.unlink()


def build_kernel_variant(name: str, edits, kernel: cfg.KernelConfig = cfg.KERNEL) -> StepResult:
    """vmlinux with edits to the kernel source (a mutant): a copy of the lab's
    build tree, so that make rebuilds only what the edits touch, and relinks."""
    base = build_kernel(kernel)
    source, _ = kernel_source(kernel)
    parts = {"kernel": base.key, "edits": edits}

    def build(out: Path) -> None:
        obj = out / "build"
        start = time.monotonic()
        shutil.copytree(base / "build", obj, symlinks=True)
        log(f"kernel-{name}: build tree copied in {time.monotonic() - start:.0f} s")
        with edited_source(source, edits):
            run(make_cmd(kernel, f"O={obj}", "vmlinux"), cwd=source, log_file=out / "build.log")
        os.link(obj / "vmlinux", out / "vmlinux")

    return cached_step(f"kernel-{name}", parts, ("vmlinux",), build)


# ---- modules ------------------------------------------------------------


def files_digest(paths) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(paths)}


def build_modules(kernel: StepResult, modules: cfg.ModulesConfig = cfg.MODULES, edits: tuple = (),
                  generation: cfg.KernelConfig = cfg.KERNEL) -> StepResult:
    """The lab's modules against kernel (a build of generation); edits (a
    mutant's, paths modules/NAME) are applied to the step's own copy of the
    sources."""
    return build_modules_in(kernel / "build", kernel.key, f"modules-{generation.name}", modules, edits, generation)


def build_modules_in(build_dir: Path, kernel_key: str, step: str, modules: cfg.ModulesConfig = cfg.MODULES,
                     edits: tuple = (), generation: cfg.KernelConfig = cfg.KERNEL, binds=()) -> StepResult:
    """The lab's modules against the kernel build tree build_dir (kernel_key
    names what was built there), as the cache step named step; binds: the
    directories outside the cache the build reads (a user's tree)."""
    sources = [p for p in modules.source_dir.iterdir() if p.is_file()]
    parts = {"kernel": kernel_key, "sources": files_digest(sources), "from_kernel": modules.from_kernel}
    if edits:
        parts["edits"] = edits
    outputs = tuple(f"{name}.ko" for name in modules.names)

    def build(out: Path) -> None:
        src = out / "src"
        src.mkdir()
        for path in sources:
            shutil.copy2(path, src / path.name)
        apply_edits(src, [(Path(path).relative_to("modules"), old, new) for path, old, new in edits])
        run(make_cmd(generation, "-C", str(build_dir), f"M={src}", "modules"), log_file=out / "build.log",
            binds=binds)
        for name in outputs:
            os.link(src / name, out / name)
        for path in modules.from_kernel:
            shutil.copy2(build_dir / path, out / Path(path).name)

    from_kernel = tuple(Path(p).name for p in modules.from_kernel)
    return cached_step(step, parts, outputs + from_kernel, build)


# ---- initramfs ----------------------------------------------------------


def apt_options(suite: str, arch: str = "ppc64el", archive: str = "", source: bool = False) -> tuple[Path, list[str]]:
    """The lab root's apt, configured for one suite of a Debian archive
    (default cfg.MIRROR) and the guest's architecture, with its lists and
    sources under the cache: neither the root's nor the host's apt
    configuration is touched. With source, for the suite's source packages
    (a deb-src line; apt-get source)."""
    archive = archive or cfg.MIRROR
    apt_dir = cfg.cache_root() / "apt" / (f"{suite}-source" if source else f"{suite}-{arch}")
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.d").mkdir(exist_ok=True)
    sources = apt_dir / "sources.list"
    kind = "deb-src" if source else "deb"
    sources.write_text(f"{kind} [signed-by=/usr/share/keyrings/debian-archive-keyring.pgp] {archive} {suite} main\n")
    return apt_dir, [
        "-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}",
        "-o", f"Dir::Etc::SourceList={sources}", "-o", f"Dir::Etc::SourceParts={apt_dir / 'sources.d'}",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}", "-o", f"Dir::Cache={apt_dir}",
        "-o", "Debug::NoLocking=1",
        # the cache belongs to the user running the lab, not to apt's sandbox user
        "-o", "APT::Sandbox::User=root",
    ]


@functools.cache
def native_architecture() -> str:
    """The lab root's dpkg architecture (the machine's)."""
    return run(["dpkg", "--print-architecture"]).strip()


def fetch_package(package: cfg.DebianPackage) -> Path:
    """The package's .deb in the cache, downloaded by the lab root's apt if
    it is not there yet (a cached one is used without the network)."""
    arch = package.arch if package.arch not in ("all", cfg.NATIVE) else native_architecture()
    apt_dir, opts = apt_options(package.suite, arch, package.archive_url)
    debs = apt_dir / "debs"
    # apt names a .deb NAME_VERSION_ARCH.deb, the epoch's colon written %3a
    pattern = f"{package.name}_{package.version.replace(':', '%3a')}_*.deb" if package.version \
        else f"{package.name}_*.deb"
    found = sorted(debs.glob(pattern)) if debs.exists() else []
    if found:
        return found[-1]
    debs.mkdir(exist_ok=True)
    wanted = f"{package.name}={package.version}" if package.version else package.name
    log(f"apt: fetching {wanted} from {package.suite}")
    update = subprocess.run(labroot.wrap(["apt-get", *opts, "update"], settings=True), capture_output=True, text=True)
    download = subprocess.run(labroot.wrap(["apt-get", *opts, "download", wanted], debs, settings=True),
                              capture_output=True, text=True)
    found = sorted(debs.glob(pattern))
    if download.returncode != 0 or not found:
        # a partly failed update (one mirror syncing) is fine if the package was found
        raise labroot.archive_failure(update.stdout + update.stderr + download.stdout + download.stderr,
                                      f"fetching {package.name} from {package.suite}")
    return found[-1]


def fetch_member(package: cfg.DebianPackage) -> Path:
    """The file package.member from the package, taken out of it once into
    the cache (only that file: a -dbg package holds gigabytes besides)."""
    unpacked = cfg.cache_root() / "members" / (
        f"{package.name}_{package.version.replace(':', '%3a')}" if package.version else package.name)
    member = unpacked / package.member
    if member.exists():
        return member
    deb = fetch_package(package)
    # taken out beside the cache entry and renamed: a killed run leaves no half file
    partial = unpacked.with_name(unpacked.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as tarfile:
        extract = subprocess.run(["tar", "-x", "-C", str(partial), f"./{package.member}"], stdin=tarfile.stdout,
                                 capture_output=True, text=True)
    if tarfile.returncode != 0 or extract.returncode != 0 or not (partial / package.member).exists():
        raise LabError(f"{deb.name} has no {package.member}: {extract.stderr.strip()}")
    shutil.rmtree(unpacked, ignore_errors=True)
    partial.rename(unpacked)
    if not package.keep_deb:
        deb.unlink()
    return member


def fetch_source_member(source: cfg.DebianSource) -> Path:
    """The file source.member of a Debian source package's upstream tarball,
    taken out of it once into the cache by the lab root's apt (apt-get source
    --download-only) and tar; the downloads are removed after. LabError if
    one of Debian's patches (debian/patches/series) changes the file: the
    lab does not apply them."""
    unpacked = cfg.cache_root() / "members" / f"{source.name}_{source.version.replace(':', '%3a')}_source"
    member = unpacked / source.member
    if member.exists():
        return member
    apt_dir, opts = apt_options(source.suite, archive=source.archive_url, source=True)
    partial = unpacked.with_name(unpacked.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    wanted = f"{source.name}={source.version}"
    log(f"apt: fetching the source of {wanted} from {source.suite}")
    update = subprocess.run(labroot.wrap(["apt-get", *opts, "update"], settings=True), capture_output=True, text=True)
    download = subprocess.run(labroot.wrap(["apt-get", *opts, "source", "--download-only", wanted], partial,
                                           settings=True), capture_output=True, text=True)
    origs = sorted(partial.glob(f"{source.name}_*.orig.tar.*"))
    debians = sorted(partial.glob(f"{source.name}_*.debian.tar.*"))
    if download.returncode != 0 or len(origs) != 1:
        shutil.rmtree(partial, ignore_errors=True)
        raise labroot.archive_failure(update.stdout + update.stderr + download.stdout + download.stderr,
                                      f"fetching the source of {wanted} from {source.suite}")
    if debians:
        patched = debian_patches_changing(debians[0], source.member)
        if patched:
            shutil.rmtree(partial, ignore_errors=True)
            raise LabError(f"Debian's {', '.join(patched)} change {source.member} of {wanted}: "
                           "the lab takes the file from the upstream tarball unpatched")
    out = partial / "tree"
    out.mkdir()
    run(["tar", "-x", "-C", str(out), "--strip-components=1", "--wildcards", f"*/{source.member}",
         "-f", str(origs[0])])
    if not (out / source.member).exists():
        raise LabError(f"{origs[0].name} has no {source.member}")
    shutil.rmtree(unpacked, ignore_errors=True)
    (out).rename(unpacked)
    shutil.rmtree(partial)
    return member


def debian_patches_changing(debian_tarball: Path, member: str) -> list[str]:
    """The patches of a Debian source package's series that change member
    (a path in the upstream tree)."""
    with tempfile.TemporaryDirectory(dir=cfg.cache_root()) as tmp:
        run(["tar", "-x", "-C", tmp, "-f", str(debian_tarball), "debian/patches"])
        patches = Path(tmp) / "debian" / "patches"
        series = (patches / "series").read_text().split("\n") if (patches / "series").exists() else []
        names = [line.split("#", 1)[0].split()[0] for line in series if line.split("#", 1)[0].strip()]
        return [name for name in names if (patches / name).exists() and any(
            line.startswith(("+++ ", "--- ")) and line.split()[1].split("/", 1)[-1] == member
            for line in (patches / name).read_text(errors="replace").splitlines() if len(line.split()) > 1)]


class CpioWriter:
    """A deterministic newc cpio archive (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(110 + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))
        self.ino += 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def gzipped(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return gzip.compress(self.buf.getvalue(), mtime=0)


def build_initramfs(modules: StepResult | None, initramfs: cfg.InitramfsConfig = cfg.INITRAMFS,
                    extra_modules: tuple[Path, ...] = ()) -> StepResult:
    """The initramfs: busybox, /init, the lab's programs and modules (None:
    none, for a kernel they were not built for); with extra_modules (a
    user's .ko files), those too, in /lib/modules/extra."""
    busybox = fetch_member(initramfs.busybox)
    parts = {
        "modules": modules.key if modules else None,
        "busybox": sha256_file(busybox),
        "init": sha256_file(initramfs.init),
        "programs": {n: sha256_file(p) for n, p in initramfs.programs.items()},
        "applets": initramfs.busybox_applets,
        "cflags": initramfs.cflags,
        "cc": tool_version(cfg.KERNEL.cross_compile + "gcc"),
    }
    if extra_modules:
        parts["extra"] = {p.name: sha256_file(p) for p in extra_modules}

    def build(out: Path) -> None:
        cpio = CpioWriter()
        for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib", "lib/modules", "lib/modules/extra"):
            cpio.directory(d)
        cpio.file("init", initramfs.init.read_bytes(), 0o755)
        cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in initramfs.busybox_applets:
            cpio.symlink(f"bin/{applet}", "busybox")
        for name, source in initramfs.programs.items():
            run([cfg.KERNEL.cross_compile + "gcc", *initramfs.cflags, "-o", str(out / name), str(source)])
            cpio.file(f"bin/{name}", (out / name).read_bytes(), 0o755)
        for ko in sorted(modules.directory.glob("*.ko")) if modules else ():
            cpio.file(f"lib/modules/{ko.name}", ko.read_bytes())
        for ko in extra_modules:
            cpio.file(f"lib/modules/extra/{ko.name}", ko.read_bytes())
        (out / "initramfs.cpio.gz").write_bytes(cpio.gzipped())

    return cached_step("initramfs", parts, ("initramfs.cpio.gz",), build)


@dataclass(frozen=True)
class LabImages:
    vmlinux: Path  # what QEMU boots
    initramfs: Path
    kernel: cfg.KernelConfig | None = None  # the lab generation; None: a user's own kernel
    kernel_build: Path | None = None  # the build tree modules are built against
    modules: Path | None = None  # the lab's modules, built for this kernel
    debug_vmlinux: Path | None = None  # what gdb reads, if not vmlinux

    @property
    def symbols(self) -> Path:
        """The vmlinux gdb reads: the one with DWARF."""
        return self.debug_vmlinux or self.vmlinux

    @property
    def name(self) -> str:
        """What boots, for messages: "the lab" or "your kernel"."""
        return "the lab" if self.kernel else "your kernel"


@contextlib.contextmanager
def cache_lock():
    """One builder at a time per cache: another process would take a step in
    progress for a half-built one and remove it."""
    check_host()
    cache = cfg.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        labroot.ensure_root()
        yield


def build_all(mutant: Mutant | None = None, kernel: str = cfg.DEFAULT_KERNEL,
              extra_modules: tuple[Path, ...] = ()) -> LabImages:
    """Build (or verify the cached) kernel of one generation (a name in
    config.KERNELS), its modules and initramfs; with a mutant, its kernel
    variant and/or modules instead (on the mutant's generation); with
    extra_modules, an initramfs that also holds those (check_user_module)."""
    generation = cfg.KERNELS[mutant.kernel if mutant else kernel]
    with cache_lock():
        built = build_kernel(generation)
        modules = build_modules(built, edits=mutant.module_edits if mutant else (), generation=generation)
        for ko in extra_modules:
            check_user_module(ko, modules)
        initramfs = build_initramfs(modules, extra_modules=tuple(extra_modules))
        vmlinux = built / "vmlinux"
        if mutant and mutant.kernel_edits:
            vmlinux = build_kernel_variant(mutant.name, mutant.kernel_edits, generation) / "vmlinux"
    return LabImages(
        kernel=generation,
        vmlinux=vmlinux,
        kernel_build=built / "build",
        modules=modules.directory,
        initramfs=initramfs / "initramfs.cpio.gz",
    )


# ---- a user's own modules -------------------------------------------------


def check_user_module(ko: Path, lab_modules: StepResult) -> None:
    """LabError, in one line, unless ko is a kernel module built for the lab
    kernel its modules were built against (the same vermagic)."""
    try:
        info = read_modinfo(ko)
    except ElfError as e:
        raise LabError(str(e)) from None
    lab = read_modinfo(next(lab_modules.directory.glob("*.ko")))
    if info.get("vermagic") != lab["vermagic"]:
        raise LabError(f"{ko} was built for '{info.get('vermagic', '?').strip()}', the lab kernel is "
                       f"'{lab['vermagic'].strip()}': build it with 'gdbklp lab build-module'")


def build_user_modules(source: Path, kernel: str = cfg.DEFAULT_KERNEL) -> list[Path]:
    """Build the external module(s) in source (a directory with a Kbuild or
    Makefile) against the lab kernel of a generation, with the lab root's
    cross compiler: make -C <kernel build> M=<source> modules. Returns the
    .ko files, which stay in source."""
    source = Path(source).resolve()
    if not source.is_dir():
        raise LabError(f"{source} is not a directory of module sources")
    generation = cfg.KERNELS[kernel]
    with cache_lock():
        built = build_kernel(generation)
        log(f"building the modules in {source} against {built / 'build'}")
        run(make_cmd(generation, "-C", str(built / "build"), f"M={source}", "modules"), binds=(source,))
    return sorted(source.glob("*.ko"))


# ---- the recorder ----------------------------------------------------------------


@dataclass(frozen=True)
class RecorderImages:
    qemu: Path     # trixie's qemu-system-ppc64 10.0, run with the lab root's libraries
    plugin: Path   # libklprecord.so, built against that QEMU's plugin header


def build_plugin(recorder: cfg.RecorderConfig = cfg.RECORDER) -> StepResult:
    """The recorder plugin, built in the lab root with its gcc and glib
    against the recorder QEMU's include/qemu/qemu-plugin.h; keyed by the
    sources, the header and the compiler as the kernel is."""
    header = fetch_source_member(recorder.header)
    parts = {
        "sources": files_digest(recorder.sources),
        "header": sha256_file(header),
        "cflags": recorder.cflags,
        "cc": tool_version("gcc"),
    }

    def build(out: Path) -> None:
        glib = run(["pkg-config", "--cflags", "glib-2.0"]).split()
        run(["gcc", *recorder.cflags, *glib, f"-I{header.parent}", f"-I{recorder.main.parent}",
             "-o", str(out / recorder.library), str(recorder.main)], log_file=out / "build.log")

    return cached_step("plugin", parts, (recorder.library,), build)


def build_recorder(recorder: cfg.RecorderConfig = cfg.RECORDER) -> RecorderImages:
    """The recorder's QEMU (fetched into the cache once) and its plugin
    (built, or verified in the cache); not part of build_all()."""
    with cache_lock():
        qemu = fetch_member(recorder.qemu)
        plugin = build_plugin(recorder)
    return RecorderImages(qemu=qemu, plugin=plugin / recorder.library)
