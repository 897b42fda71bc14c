"""Folders tracelib writes and reads back: safe reads of named files, and atomic, non-destructive replacement.

Reading (`read_member`) opens one named regular file directly inside a folder: never a symlink
(`O_NOFOLLOW`), never a FIFO, device or folder (checked with `fstat` before reading, and opened
non-blocking so a FIFO cannot hang the open), never a path with a separator or `..`, and never more
bytes than the caller allows (the size is checked before anything is read).

Writing (`replace_folder`) builds the new folder as a hidden sibling, `.NAME.tmp-TAG`, fsyncs it,
and then, under a lock on the parent folder, moves the old folder aside to `.NAME.old-TAG`, moves
the new one in, and only then deletes the files it knows in the old one. So an interruption at any
moment leaves the old folder, the new folder, or (killed between the two renames) the old folder
recoverable at `.NAME.old-TAG`; `leftovers` finds those, and the loader says how to restore them.
Two saves to one path cannot both win: the one that finds the folder changed since it started
raises `FolderChangedError`, and the other's result stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

try:  # POSIX; on Windows saves are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None

# The hidden siblings' names keep at most this much of the folder's name, so that a name near the
# file system's 255-byte limit still leaves room for ".NAME.tmp-12345678".
_STEM = 200
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class MemberError(OSError):
    """A named file in a folder cannot be read safely; `reason` says why in words."""

    def __init__(self, path: Path, reason: str, kind: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.kind = path, reason, kind


class FolderChangedError(OSError):
    """Another writer replaced the folder between this save's start and its commit."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_member(folder: Path, name: str, *, max_bytes: int, expected_bytes: int | None = None) -> bytes:
    """The bytes of the regular file `folder/name`, read safely (see the module docstring).

    Raises:
        MemberError: with `kind` one of "missing", "not-regular", "too-large", "size", "unreadable".
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise MemberError(folder / name, "is not a plain file name", "not-regular")
    path = folder / name
    flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise MemberError(path, "does not exist", "missing") from err
    except OSError as err:
        if err.errno == errno.ELOOP or path.is_symlink():
            raise MemberError(path, "is a symbolic link; only regular files are read", "not-regular") from err
        raise MemberError(path, f"cannot be opened ({err.strerror or err})", "unreadable") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MemberError(path, f"is {_kind(info.st_mode)}, not a regular file", "not-regular")
        if expected_bytes is not None and info.st_size != expected_bytes:
            raise MemberError(
                path,
                f"is {info.st_size} bytes, but was {expected_bytes} when saved: it is "
                f"{'truncated' if info.st_size < expected_bytes else 'longer than saved'}",
                "size",
            )
        if info.st_size > max_bytes:
            raise MemberError(path, f"is {info.st_size} bytes, more than the {max_bytes} allowed", "too-large")
        # A regular file opened with O_NONBLOCK reads normally; switch it off to be plain.
        os.set_blocking(fd, True)
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) != info.st_size or os.read(fd, 1):
            raise MemberError(path, "changed size while it was being read", "size")
        return data
    except OSError as err:
        if isinstance(err, MemberError):
            raise
        raise MemberError(path, f"cannot be read ({err.strerror or err})", "unreadable") from err
    finally:
        os.close(fd)


def stem(path: Path) -> str:
    return path.name[:_STEM]


def leftovers(path: Path) -> list[Path]:
    """Hidden siblings an interrupted save left next to `path`: `.NAME.old-*` and `.NAME.tmp-*`."""
    parent = path.parent
    prefix = f".{stem(path)}."
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [parent / n for n in names if n.startswith(prefix) and n[len(prefix) :].startswith(("old-", "tmp-"))]


def state(path: Path) -> tuple | None:
    """What is at `path` now, as (inode, device, mtime); None when nothing is."""
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (info.st_ino, info.st_dev, info.st_mtime_ns)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write `data` to a new file and fsync it."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on the folder itself: no lock file is left behind)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | _O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_own(folder: Path, names: tuple[str, ...]) -> bool:
    """Delete the files `names` in `folder`, then the folder if nothing else is in it.

    Returns whether the folder is gone. Anything else in it is left alone (tracelib never deletes
    what it did not write).
    """
    for name in names:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            os.unlink(folder / name)
    try:
        os.rmdir(folder)
        return True
    except OSError:
        return False


def replace_folder(path: Path, write: Callable[[Path], None], own: tuple[str, ...], *, started: tuple | None) -> None:
    """Put a folder that `write(tmp)` fills at `path`, atomically (see the module docstring).

    Args:
        path: where the folder goes; an existing folder there (holding only `own` files; the
            caller checks) is replaced.
        write: fills the new, empty folder it is given.
        own: the file names a folder of this kind holds; only these are deleted from the old one.
        started: `state(path)` when the caller checked what was there; if another writer changed
            it since, `FolderChangedError` is raised and nothing at `path` is touched.

    Raises:
        FolderChangedError: another save replaced `path` meanwhile.
        OSError: from the file system, unchanged (the caller names the user's path).
    """
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{stem(path)}.tmp-{tag}"
    old = path.parent / f".{stem(path)}.old-{tag}"
    os.mkdir(tmp)
    try:
        write(tmp)
        fsync_dir(tmp)
        with _locked(path.parent):
            if state(path) != started:
                raise FolderChangedError(errno.EEXIST, "another save replaced it while this one was writing")
            if started is not None:
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # put the previous folder back where it was
                    raise
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException:
        remove_own(tmp, own)
        raise
    if started is not None:
        remove_own(old, own)
