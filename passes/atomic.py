"""Publishing outputs safely: a file or directory is written under a temporary name beside
its target and only then put in place, so a crash, Ctrl-C or SIGTERM never leaves a
half-written output, and an existing output is replaced only when asked.

* ``atomic_write(path, write, replace=...)``: a file. Without ``replace`` it is published
  with a hard link, which fails when ``path`` appeared meanwhile (another run got there
  first: ``FileExistsError``); with ``replace`` by ``os.replace``, keeping the replaced file's
  permission bits.
* ``atomic_dir(path, replace=...)``: a directory. Linux's ``renameat2`` publishes it without
  replacing (``RENAME_NOREPLACE``) or swaps it with the old one in one step
  (``RENAME_EXCHANGE``), so ``path`` always holds either the old or the new directory.
* Temporaries are named ``.flurka-<pid>-*``; ``sweep(folder)`` removes those whose process
  is gone (a run killed by SIGKILL or a power cut), and runs before every publish.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from typing import Callable, Iterator

_PREFIX = ".flurka-"
_STALE = re.compile(r"\.flurka-(\d+)-")
_AT_FDCWD = -100
_NOREPLACE, _EXCHANGE = 1, 2


def _prefix() -> str:
    return f"{_PREFIX}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: str) -> list[str]:
    """Remove this tool's temporaries in ``folder`` left by processes that no longer run;
    return their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _STALE.match(name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(name)
    return removed


def _default_mode(directory: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's own I/O (a full disk raises ``OSError``, where
    torch's C++ writer aborts the process), flushed to disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, write: Callable[[str], None], *, replace: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then publish it as ``path``
    (see the module docstring). Raises ``FileExistsError`` when ``path`` exists and not
    ``replace``; any failure leaves ``path`` as it was and no temporary behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    sweep(folder)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(), suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode) if replace else None
        except FileNotFoundError:
            mode = None
        os.chmod(tmp, _default_mode(False) if mode is None else mode)
        if replace:
            os.replace(tmp, path)
        else:
            _link_exclusive(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _link_exclusive(tmp: str, path: str) -> None:
    try:
        os.link(tmp, path)  # fails with FileExistsError when path exists: never replaces
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists (written meanwhile by another run?)",
                              path) from None
    except OSError:  # a filesystem without hard links: claim the name, then fill it
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.replace(tmp, path)


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """renameat2(2); False where the system or filesystem does not have it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)


def _publish_dir(tmp: str, path: str, replace: bool) -> str | None:
    """Move ``tmp`` to ``path``; return where the replaced directory now is (to remove)."""
    exists = os.path.lexists(path)
    if exists and not replace:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)  # an empty directory is not an output to keep
            exists = False
        else:
            raise FileExistsError(errno.EEXIST, "exists", path)
    if not exists:
        if not _renameat2(tmp, path, _NOREPLACE):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "exists", path)
            os.rename(tmp, path)
        return None
    if _renameat2(tmp, path, _EXCHANGE):
        return tmp  # the old directory now has the temporary name
    old = tempfile.mkdtemp(prefix=_prefix(), dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)  # no atomic swap here: for an instant path is missing
    os.rename(tmp, path)
    return old


@contextlib.contextmanager
def atomic_dir(path: str, *, replace: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; when the block succeeds it becomes
    ``path`` (replacing an existing one only if ``replace``), when it fails it is removed and
    ``path`` is left as it was. Checking that an existing directory may be replaced is the
    caller's job."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    sweep(parent)
    tmp = tempfile.mkdtemp(prefix=_prefix(), dir=parent)
    old = None
    try:
        yield tmp
        try:  # keep a replaced directory's permission bits; mkdtemp makes 0700
            mode = stat.S_IMODE(os.stat(path).st_mode) if replace else _default_mode(True)
        except FileNotFoundError:
            mode = _default_mode(True)
        os.chmod(tmp, mode)
        old = _publish_dir(tmp, path, replace)
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.isdir(leftover) and leftover != path:
                shutil.rmtree(leftover, ignore_errors=True)
