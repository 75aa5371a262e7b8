"""gdb commands that load this gdbklp into gdb-multiarch, from wherever it is
installed (a wheel in a venv, or a checkout's editable install), and where to
install them (pure Python: `gdbklp gdbinit` and gdbklp.gdbmi use it).

gdb runs Python extensions in the Python it embeds, so the commands put on
gdb's sys.path the directory this gdbklp is imported from and the
site-packages of the environment running this code (capstone is there), and
refuse in one line inside a gdb that embeds another Python version.
"""

import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import gdbklp
from gdbklp.errors import GdbklpError

BEGIN, END = "# >>> gdbklp >>>", "# <<< gdbklp <<<"
SCOPES = ("user", "system")


def import_dirs() -> list[str]:
    """The directories gdb's Python needs: where the gdbklp package is, then
    this environment's site-packages (the same one for a wheel install)."""
    dirs = [str(Path(gdbklp.__file__).resolve().parent.parent), sysconfig.get_paths()["purelib"]]
    return list(dict.fromkeys(dirs))


def script() -> str:
    """gdb commands loading this gdbklp (a `python` block, for gdb -x or source)."""
    version = tuple(sys.version_info[:2])
    return f"""{BEGIN}
# gdbklp {gdbklp.__version__} for Python {version[0]}.{version[1]} ({sys.prefix}); made by `gdbklp gdbinit`
python
import sys
if tuple(sys.version_info[:2]) != {version!r}:
    print("gdbklp: not loaded: installed for Python {version[0]}.{version[1]} ({sys.prefix}), "
          "this gdb embeds Python %d.%d: install gdbklp with that Python" % sys.version_info[:2])
else:
    sys.path[:0] = [d for d in {import_dirs()!r} if d not in sys.path]
    try:
        import gdbklp.gdbext
    except Exception as e:
        print(f"gdbklp: not loaded: {{type(e).__name__}}: {{e}}")
    else:
        gdbklp.gdbext.start()
end
{END}
"""


def loader_file() -> Path:
    """script() in a file, for gdb -x (a gdb that gdbklp starts itself):
    gdbinit-HASH.gdb in gdbklp's cache, written when missing."""
    text = script()
    cache = gdbklp.cache_root()
    path = cache / f"gdbinit-{hashlib.sha256(text.encode()).hexdigest()[:16]}.gdb"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}")
        partial.write_text(text)
        partial.replace(path)  # whole or not at all, for gdbs started side by side
    return path


def _ask(gdb: str, option: str) -> str:
    try:
        return subprocess.run([gdb, option], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GdbklpError(f"cannot run {gdb} {option}: {e}") from e


def user_init_file(gdb: str = "gdb-multiarch") -> Path:
    """The home init file gdb reads (it reads one: the first found of
    $XDG_CONFIG_HOME/gdb/gdbinit, ~/.config/gdb/gdbinit, ~/.gdbinit), as gdb
    --help lists it; ~/.config/gdb/gdbinit when there is none yet."""
    listing = _ask(gdb, "--help")
    late = listing.split("reads the following init files", 1)[-1]  # not the early init files
    for line in late.splitlines():
        if "user-specific init file:" in line:
            return Path(line.split("user-specific init file:", 1)[1].strip())
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "gdb" / "gdbinit"


def system_init_dir(gdb: str = "gdb-multiarch") -> Path:
    """The directory whose files gdb runs at start-up, as gdb --configuration says."""
    for word in _ask(gdb, "--configuration").split():
        if word.startswith("--with-system-gdbinit-dir="):
            return Path(word.split("=", 1)[1])
    raise GdbklpError(f"{gdb} was built without a system init directory (--with-system-gdbinit-dir): "
                      "use --install user")


def replace_block(text: str, block: str) -> str:
    """text with its gdbklp block (BEGIN to END) replaced by block, or block appended."""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + block + tail
    return text + ("\n" if text and not text.endswith("\n") else "") + block


def install(scope: str, gdb: str = "gdb-multiarch") -> Path:
    """Write script() where gdb reads it at start-up: into the user's init file
    (its gdbklp block replaced, the rest kept) or as gdbklp.gdb in gdb's
    system init directory."""
    if scope == "system":
        path, text = system_init_dir(gdb) / "gdbklp.gdb", script()
    else:
        path = user_init_file(gdb)
        text = replace_block(path.read_text() if path.exists() else "", script())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as e:
        raise GdbklpError(f"cannot write {path}: {e.strerror}") from e
    return path


def configure(parser) -> None:
    parser.add_argument("--install", choices=SCOPES,
                        help="write the commands where gdb reads them at start-up: the user's init file "
                             "(~/.config/gdb/gdbinit, or the one gdb already reads) or gdbklp.gdb in "
                             "gdb's system init directory (/etc/gdb/gdbinit.d on Debian); without it, print them")
    parser.add_argument("--gdb", default="gdb-multiarch",
                        help="the gdb whose init file or directory --install writes to (default: %(default)s)")
    parser.set_defaults(func=_main)


def _main(args) -> int:
    if args.install is None:
        sys.stdout.write(script())
    else:
        print(f"gdbklp: loaded by {args.gdb} at start-up from {install(args.install, args.gdb)}")
    return 0
