"""Host set-up helpers for ./bootstrap (standard library only: runs before the venv)."""

import sys

from gdbklp.lab import config as cfg
from gdbklp.lab.build import missing_requirements


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["missing-packages"]:
        print(" ".join(sorted({r.package for r in missing_requirements(cfg.HOST_REQUIREMENTS)})))
        return 0
    print("usage: python3 -m gdbklp.lab.host missing-packages", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
