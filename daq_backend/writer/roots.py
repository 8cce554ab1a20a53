"""Where the DAQ may write: its output roots, and the path rules every process that writes applies.

The roots are the folders given with ``--output-root`` (repeatable; to ``std-daq up``, ``rest``,
``writer-agent`` and ``h5-writer``), else those of ``STD_DAQ_OUTPUT_ROOTS`` (``:``-separated), else
the default data root ``$XDG_DATA_HOME/std-daq`` (``~/.local/share/std-daq`` when ``XDG_DATA_HOME``
is unset or not absolute), a folder of the user the DAQ runs as, created when a request first needs
it. There is no "anywhere".

A file may be written only inside a root:

* a relative ``output_file`` is taken inside the first root;
* the path is normalised (``..`` removed) and its folder resolved (symlinks followed) before the
  check, so neither ``..`` nor a symlink leads out of a root; the file itself must not be a symlink;
* the process that opens the file (the h5 writer) checks again at open time: :func:`open_folder`
  opens the resolved folder component by component from its root with ``O_NOFOLLOW``, so a folder
  swapped for a symlink after the first check is refused, and the file is created in the folder that
  descriptor holds.

Path limits (Linux): a name component at most :data:`MAX_NAME_BYTES` bytes, the whole path at most
:data:`MAX_PATH_BYTES` bytes, UTF-8, no NUL.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

OUTPUT_ROOTS_ENV = "STD_DAQ_OUTPUT_ROOTS"
#: the command-line option that allows another folder
ROOT_FLAG = "--output-root"
#: NAME_MAX: bytes of one path component
MAX_NAME_BYTES = 255
#: PATH_MAX less its terminating NUL: bytes of a whole path
MAX_PATH_BYTES = 4095


class OutsideRootsError(ValueError):
    """A path that lies outside every output root (the message names the roots and the flag)."""


def default_data_root() -> Path:
    """``$XDG_DATA_HOME/std-daq``, or ``~/.local/share/std-daq`` (the XDG base directory rule: an
    unset or relative ``XDG_DATA_HOME`` is ignored)."""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "std-daq"


def output_roots(given: Sequence[str | Path] | None = None) -> list[Path]:
    """The roots in force: ``given`` (the ``--output-root`` options) if any, else
    ``STD_DAQ_OUTPUT_ROOTS``, else the default data root. Absolute, ``~`` expanded, normalised."""
    if given:
        raw = [str(r) for r in given]
    else:
        raw = [p for p in os.environ.get(OUTPUT_ROOTS_ENV, "").split(":") if p.strip()]
    roots = [Path(os.path.abspath(os.path.expanduser(r))) for r in raw] or [default_data_root()]
    return list(dict.fromkeys(roots))


def check_path_text(value: str) -> None:
    """Refuse a path no Linux file system takes: NUL, text that is not UTF-8, a component over
    :data:`MAX_NAME_BYTES` bytes or a path over :data:`MAX_PATH_BYTES` bytes. Raises ``ValueError``."""
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid UTF-8 text (a lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"is {len(encoded)} bytes long, a path may have at most {MAX_PATH_BYTES}")
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            shown = part[:40].decode("utf-8", "replace")
            raise ValueError(f"has a {len(part)}-byte name ({shown}...), a file or folder name may have at "
                             f"most {MAX_NAME_BYTES} bytes")


def resolve_output_path(output_file: str, roots: Sequence[Path]) -> str:
    """``output_file`` normalised; a relative one taken inside the first root."""
    if not os.path.isabs(output_file) and roots:
        output_file = os.path.join(roots[0], output_file)
    return os.path.normpath(output_file)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _listed(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def outside_message(path: str | Path, roots: Sequence[Path]) -> str:
    """What the user is told about a file outside every root."""
    return (f"{path} is outside the folders this DAQ writes to ({_listed(roots)}); write inside one of "
            f"them (a relative name goes into {roots[0]}), or start the DAQ with {ROOT_FLAG} FOLDER "
            "(repeatable) to allow another folder")


def real_root_of(folder: Path, roots: Sequence[Path], shown: str | Path | None = None) -> Path:
    """The resolved root that the resolved ``folder`` lies in. Raises :class:`OutsideRootsError`
    (naming ``shown``, default the folder)."""
    real = Path(os.path.realpath(folder))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if _inside(real, real_root):
            return real_root
    raise OutsideRootsError(outside_message(shown if shown is not None else folder, roots))


def confine(path: str | Path, roots: Sequence[Path], *, create_default: bool = True) -> Path:
    """Check that the absolute, normalised ``path`` may be written: its folder, resolved, lies inside
    a resolved root and the file is no symlink. Creates the default data root if it is one of the
    roots, missing and the file's folder. Returns ``path``. Raises :class:`OutsideRootsError` or
    ``ValueError``."""
    path = Path(path)
    folder = path.parent
    if create_default:
        default = default_data_root()
        if default in roots and folder == default and not os.path.lexists(default):
            try:
                default.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ValueError(f"cannot create the data root {default} ({exc.strerror})") from None
    real_root_of(folder, roots, path)
    if os.path.islink(path):
        raise ValueError(f"{path} is a symbolic link; the DAQ never writes through one")
    return path


def open_folder(folder: str | Path, roots: Sequence[Path]) -> int:
    """A descriptor of ``folder`` (``O_DIRECTORY``) reached from the root it lies in by opening each
    component of its resolved path with ``O_NOFOLLOW``: what the file is then created in is inside the
    root even if a component was swapped for a symlink after :func:`confine`. The caller closes it.
    Raises :class:`OutsideRootsError` or ``ValueError``."""
    folder = Path(folder)
    real_root = real_root_of(folder, roots)
    real = Path(os.path.realpath(folder))
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        fd = os.open(real_root, flags)
    except OSError as exc:
        raise ValueError(f"cannot open the output root {real_root} ({exc.strerror})") from None
    try:
        for part in real.relative_to(real_root).parts:
            try:
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise ValueError(f"cannot create a file in {folder}: the folder does not exist") from None
            except OSError as exc:
                raise ValueError(f"cannot create a file in {folder}: it changed while it was checked "
                                 f"({part}: {exc.strerror}); refusing to follow it") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(dir_fd: int, name: str = "") -> str:
    """A path that names ``name`` inside the folder held by ``dir_fd`` (``/proc/self/fd``): for
    libraries that take only path names (HDF5)."""
    return f"/proc/self/fd/{dir_fd}/{name}" if name else f"/proc/self/fd/{dir_fd}"


def add_output_root_option(parser: argparse.ArgumentParser) -> None:
    """``--output-root FOLDER`` (repeatable) on a command that decides where files go."""
    parser.add_argument(
        ROOT_FLAG, "--output_root", dest="output_roots", action="append", type=Path, default=None,
        metavar="FOLDER",
        help=f"a folder files may be written in (repeatable; default: env {OUTPUT_ROOTS_ENV}, else "
             f"$XDG_DATA_HOME/std-daq = {default_data_root()})",
    )
