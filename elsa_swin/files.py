"""Writing checkpoints and run files so that a crash, a kill or a full disk never leaves a half-written file under its
final name: write a temporary file in the same folder, flush and fsync it, then ``os.replace`` it over
the old one (atomic on POSIX), and fsync the folder."""

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

PathLike = str | Path


class NoSpaceError(OSError):
    """The disk filled up while writing; the previous file was kept."""


def _file_mode() -> int:
    """The mode an ordinary new file gets (mkstemp's temporary files are 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` atomically. A full disk raises :class:`NoSpaceError` naming the folder,
    with the previous file intact and no temporary file left behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(
                e.errno, f"no space left on {path.parent} while writing {path.name}; the previous {path.name} is kept"
            ) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_bytes` (serialised in memory first, so that a full disk is
    an ``OSError`` from the write, not an error inside torch's zip writer)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def atomic_link(src: PathLike, dst: PathLike) -> None:
    """Make ``dst`` a hard link of ``src`` (a copy where links are not possible), replacing any old ``dst``
    atomically: it is never missing in between."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write_bytes(dst, src.read_bytes())
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
