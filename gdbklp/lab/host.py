"""What the host must have, and the checks ./bootstrap runs on it (standard
library only: they run before the venv exists)."""

import shutil
import sys
from pathlib import Path

from gdbklp.lab import LabError
from gdbklp.lab import config as cfg
from gdbklp.lab import root as labroot


def missing_requirements(requirements=None) -> list[cfg.HostRequirement]:
    """The requirements (by default the host's) that are missing; inside the
    lab root, which has everything the lab needs, none by default."""
    if requirements is None:
        requirements = () if labroot.inside_lab_root() else cfg.HOST_REQUIREMENTS
    return [req for req in requirements
            if not (Path(req.path).exists() if req.path.startswith("/") else shutil.which(req.path))]


def check_host(requirements=None) -> None:
    """Raise LabError naming the packages to install if any requirement is missing."""
    missing = missing_requirements(requirements)
    if missing:
        names = ", ".join(r.path for r in missing)
        pkgs = " ".join(sorted({r.package for r in missing}))
        raise LabError(f"missing {names}: install with 'apt-get install {pkgs}'")


def os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    fields = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        name, sep, value = line.partition("=")
        if sep:
            fields[name] = value.strip().strip('"')
    return fields


def unsupported_host(release: dict[str, str]) -> str | None:
    """One line saying why this host is not one gdbklp supports, or None."""
    if release.get("ID") == "debian" and release.get("VERSION_ID") in cfg.SUPPORTED_RELEASES:
        return None
    supported = " and ".join(f"Debian {v} ({name})" for v, name in cfg.SUPPORTED_RELEASES.items())
    return f"this host is {release.get('PRETTY_NAME', 'not Debian')}; gdbklp supports {supported}"


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["missing-packages"]:
        problem = unsupported_host(os_release())
        if problem:
            print(f"bootstrap: {problem}", file=sys.stderr)
            return 1
        print(" ".join(sorted({r.package for r in missing_requirements()})))
        return 0
    print("usage: python3 -m gdbklp.lab.host missing-packages", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
