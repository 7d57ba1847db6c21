"""Output destinations a real machine can break: checked before the work, written atomically,
locked, and their faults said in one line.

* :func:`output_path`: a destination with ``~`` expanded and symbolic links followed, so a
  symlinked output is written (and locked) at its target and the link stays a link;
* :func:`check_writable_folder`: a folder this process can really create files in (a file is
  made and removed: ``os.access`` says yes to root on ``/proc`` and on read-only mounts);
  :func:`check_free_space`: room for what is known to be written;
* :func:`atomic_write`: a temporary file beside the destination, renamed over it, so a full
  disk, a Ctrl-C or a ``kill -9`` leaves the old file or the new one, never half of one;
* :func:`exclusive`: one writer of an output at a time (a ``.<name>.lock`` file beside it,
  ``flock``; removed when the block ends); a lock file that cannot be made is a one-line error,
  never an endless wait;
* :func:`os_error_line` / :func:`os_error_exit_code`: an ``OSError`` (a full disk, a path that
  cannot be written) as one line naming the file and what to do, and its exit code (2 where a
  path given is unusable, 1 where the machine failed: no space, an I/O error).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class ResultFileError(ValueError):
    """An output that cannot be used for this run (the message says what to do)."""


def output_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded and every symbolic link followed (a dangling link: to the
    file it names), so that writing it replaces the link's target, not the link."""
    path = Path(path).expanduser()
    real = os.path.realpath(path)
    return Path(real) if real != os.path.abspath(path) else path


# --- checks made before the work ---------------------------------------------------------------

def check_writable_folder(folder: str | Path, what: str) -> Path:
    """``folder`` exists, is a folder and this process can create files in it (tried: a file
    is created and removed); :class:`ResultFileError` naming ``what`` otherwise."""
    folder = Path(folder)
    if not folder.exists():
        raise ResultFileError(f"{what} does not exist")
    if not folder.is_dir():
        raise ResultFileError(f"{what} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResultFileError(f"{what} is not writable (permission denied); choose another place")
    probe = folder / f".mmneurons-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return folder
    except OSError as exc:
        raise ResultFileError(f"{what} is not writable ({exc.strerror or exc}); choose another place") from None
    os.close(fd)
    try:
        probe.unlink()
    except OSError:
        pass
    return folder


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """``folder``'s file system has room for ``needed`` bytes (and a margin of 10 % + 1 MB)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return                      # the writes themselves will say what is wrong
    if free < needed * 1.1 + (1 << 20):
        raise ResultFileError(f"{what} needs about {_size(needed)} but {folder} has {_size(free)} free; "
                              "free some space or choose another place")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# --- atomic writes -------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def temporary_name(path: str | Path) -> Path:
    """The temporary file of ``path`` for this process: ``.<name>.<pid>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the ``.<name>.<pid>.tmp`` files beside ``path`` whose process is gone (left by
    a run that was killed while writing); returns them."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.tmp")
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        match = pattern.fullmatch(candidate.name)
        if match and int(match[1]) != os.getpid() and not _pid_alive(int(match[1])):
            try:
                if candidate.is_dir():
                    continue
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass
    return removed


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (its target, when ``path`` is a
    symbolic link), then rename it over ``path`` (same folder, so the rename is atomic): a
    killed run or a full disk leaves the old file or the new one, never half of one, and no
    temporary file is left behind (one left by a killed run is removed here)."""
    path = output_path(path)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- one writer at a time ----------------------------------------------------------------------

def lock_path(path: str | Path) -> Path:
    """The lock file of output ``path`` (of its target, when it is a symbolic link)."""
    path = output_path(path)
    return path.with_name(f".{path.name}.lock")


def _open_lock(lock: Path) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:          # another user's lock file: flock works on a read-only one
        try:
            return os.open(lock, os.O_RDONLY)
        except OSError as exc:
            error = exc
    except OSError as exc:
        error = exc
    raise ResultFileError(f"cannot use the lock file {lock} ({error.strerror or error}); "
                          f"remove it if it is left over, or choose another place for the output")


@contextmanager
def exclusive(path: str | Path):
    """Hold the lock of output ``path`` (``.<name>.lock`` beside its target) for the block: a
    second writer of the same output waits (saying so in one line) until the first is done,
    then sees its rows. The lock file is removed when the block ends."""
    try:
        import fcntl
    except ImportError:              # not POSIX: filelock's own lock
        from filelock import FileLock

        with FileLock(str(lock_path(path))):
            yield output_path(path)
        return
    target, lock = output_path(path), lock_path(path)
    said = False
    while True:
        fd = _open_lock(lock)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(f"mmneurons: {target} is being written by another run; waiting for it to "
                          "finish (Ctrl-C to stop)", file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise ResultFileError(f"cannot lock {lock} ({exc.strerror or exc}); this file system "
                                      "has no file locks: choose another place for the output") from None
            try:   # the holder before us removed the file we waited on: lock the new one
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield target
    finally:
        try:
            lock.unlink()            # while still held: a waiter on it locks a fresh file
        except OSError:
            pass
        os.close(fd)


# --- faults said in one line -----------------------------------------------------------------------

_MACHINE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EFBIG}
_WHAT_TO_DO = {
    errno.ENOSPC: "free some space (or choose another place) and rerun",
    errno.EDQUOT: "free some space within your quota (or choose another place) and rerun",
    errno.EACCES: "choose a place you can write",
    errno.EPERM: "choose a place you can write",
    errno.EROFS: "the file system is read-only: choose another place",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
}


def os_error_line(exc: OSError) -> str:
    """``exc`` in one line: what failed, on which file, and what to do."""
    number = exc.errno or _errno_in_text(str(exc))
    what = exc.strerror or (os.strerror(number) if number else str(exc).split("\n")[0])
    name = exc.filename or _path_in_text(str(exc))
    where = f" ({name})" if name else ""
    advice = _WHAT_TO_DO.get(number, "check the file and rerun")
    return " ".join(f"{what}{where}; {advice}".split())


def os_error_exit_code(exc: OSError) -> int:
    """1 where the machine failed (no space, an I/O error), 2 where a path given cannot be used."""
    number = exc.errno or _errno_in_text(str(exc))
    return 1 if number in _MACHINE_FAULTS or number is None else 2


def _errno_in_text(text: str) -> int | None:
    """The errno that a library's message holds (``[Errno 28]``, pyarrow's ``errno 28``)."""
    match = re.search(r"[Ee]rrno (\d+)", text)
    if match:
        return int(match[1])
    if "No space left" in text:
        return errno.ENOSPC
    return None


def _path_in_text(text: str) -> str | None:
    match = re.search(r"'(/[^']+)'", text)
    return match[1] if match else None
