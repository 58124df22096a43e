"""An output folder that a run replaces all-or-nothing, one run at a time.

``with OutputFolder(path, overwrite, names) as folder:`` claims the folder for one run:

- a lock file beside it (``.NAME.eoir-lock``; ``fcntl.flock``, ``msvcrt.locking`` on Windows):
  a second run into the same folder while the first holds it is refused with a clear error;
- what killed runs left beside it is cleaned: staging folders ``.NAME.partial-PID-*`` of
  processes that are gone are deleted, and a folder set aside by a swap that was cut between its
  renames (``.NAME.old-PID``) is renamed back (the previous set) when the output folder is
  missing, deleted otherwise;
- a folder that holds anything needs ``overwrite``; the current folder (or one above it) is
  refused, since the swap replaces the folder itself.

``folder.commit(files)`` runs each writer into a new staging folder beside the output, checks
each file (``written.check_written``: ITK's NIfTI writer does not raise on a full disk), links
the folder's other entries into it (``overwrite`` replaces this command's files, ``names``, and
keeps the user's), then swaps the folders: on Linux in one step (``renameat2`` with
``RENAME_EXCHANGE``), elsewhere in three (output -> aside, staging -> output, delete aside). A
kill at any moment leaves the complete previous set or the complete new set (or, between the
three renames, the previous set aside, which the next claim renames back). A SIGINT or SIGTERM
during the swap takes effect after it (``interrupts.deferred``).

``EOIR_WRITE_DELAY_S``: seconds to sleep after each step of ``commit`` (each file, the links, the
swap). Unset in normal use; the fault-injection tests set it so that kills at random moments
land inside this short stage.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from EOIRRegistrationLib.cli import interrupts
from EOIRRegistrationLib.cli.written import check_written
from EOIRRegistrationLib.core.errors import InputError, OutputError

DELAY_ENV = "EOIR_WRITE_DELAY_S"
POSIX = os.name == "posix"


def _pause() -> None:
    try:
        delay = float(os.environ.get(DELAY_ENV) or 0)
    except ValueError:
        delay = 0.0
    if delay > 0:
        time.sleep(delay)


def _owner_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. (Windows has no probe that leaves the process alone: False,
    and the lock alone decides.)"""
    if pid == os.getpid():
        return True
    if not POSIX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _try_lock(fd: int) -> bool:
    try:
        if POSIX:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


class _LockFile:
    """A lock file removed on release; a killed holder's lock dies with it (the kernel's)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self, out: Path) -> None:
        for _ in range(20):  # the file may be unlinked between open and lock by a releasing run
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                try:
                    holder = os.read(fd, 32).decode().strip() or "?"
                except OSError:
                    holder = "?"
                os.close(fd)
                raise OutputError(f"another run (process {holder}) is writing to {out}; wait "
                                  "for it to end or choose another output folder")
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
                return
            os.close(fd)
        raise OutputError(f"cannot lock {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        if POSIX:  # unlink while holding it: a run that opened it first finds it replaced
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if not POSIX:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:  # another run opened it meanwhile
                pass


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


class OutputFolder:
    """One run's claim on an output folder (see the module docstring)."""

    def __init__(self, path, overwrite: bool, names, inputs: dict | None = None):
        """inputs: what the run reads (role -> path or None): refused where a file it writes
        would replace one of them."""
        out = Path(path)
        self.path = out.resolve() if out.is_symlink() else out.absolute()
        self.overwrite, self.names = overwrite, tuple(names)
        self.inputs = {role: p for role, p in (inputs or {}).items() if p}
        self.committed = False
        self._lock = _LockFile(self.path.parent / f".{self.path.name}.eoir-lock")
        self._created: list[Path] = []

    def _prefix(self, kind: str) -> str:
        return f".{self.path.name}.{kind}-"

    def __enter__(self) -> OutputFolder:
        out = self.path
        if out.exists() and not out.is_dir():
            raise InputError(f"--output-dir {out} exists and is not a folder")
        cwd = Path.cwd().resolve()
        if out.is_dir() and (cwd == out.resolve() or out.resolve() in cwd.parents):
            raise InputError(f"--output-dir {out} holds the current folder; the outputs replace "
                             "the output folder as a whole: choose a folder of their own")
        self._check_inputs()
        parent = out.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(out)
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"cannot write to {out.parent}: {exc.strerror or exc}") from exc
        except BaseException:
            self._remove_created()
            raise
        try:
            self._recover()
            self._check()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if isinstance(exc, interrupts.Interrupted):
            exc.committed = self.committed
        self._release()

    def _release(self) -> None:
        self._lock.release()
        if not self.committed:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; stops at one that holds something
            try:
                folder.rmdir()
            except OSError:
                break

    def _recover(self) -> None:
        """Undo what killed runs left beside the folder (we hold the lock: they are gone)."""
        out, name = self.path, re.escape(self.path.name)
        leftover = re.compile(rf"\.{name}\.(?:(old)-(\d+)|partial-(\d+)-\w+)")
        for entry in sorted(out.parent.iterdir()):
            match = leftover.fullmatch(entry.name)
            if not match or _owner_alive(int(match[2] or match[3])):
                continue
            if match[1] and not out.exists():  # a swap cut between its renames: the old set
                os.rename(entry, out)
            else:
                shutil.rmtree(entry, ignore_errors=True)

    def _check_inputs(self) -> None:
        """An input that is one of the folder's files of this command's names would be lost with
        the swap (those entries are not carried over): refused. ``samefile`` also sees it through
        a symbolic link and under another letter case (macOS and Windows file systems)."""
        ours = [self.path / name for name in self.names if (self.path / name).exists()]
        for role, given in self.inputs.items():
            if not os.path.exists(given):
                continue  # reading it says so
            for target in ours:
                if os.path.samefile(given, target):
                    raise InputError(f"the {role} {given} is {target.name} in the output folder, "
                                     "a file this command writes: it would be replaced; choose "
                                     "another --output-dir, or move the file")

    def _check(self) -> None:
        if not self.overwrite and self.path.is_dir() and any(self.path.iterdir()):
            raise InputError(f"output folder {self.path} is not empty; pass --overwrite to "
                             f"replace this command's files in it ({', '.join(self.names)})")

    def commit(self, files: dict) -> None:
        """Write ``files`` (name -> writer(path)), each checked, and put them in place together;
        on any failure the folder is left as it was. The last writer runs after the others
        (it may report their time); the others in parallel threads (ITK's NIfTI writer
        compresses outside the interpreter lock)."""
        out = self.path
        self._check()
        staging = Path(tempfile.mkdtemp(prefix=f"{self._prefix('partial')}{os.getpid()}-",
                                        dir=out.parent))
        try:
            try:
                self._write_all(staging, files)
                self._carry_over(staging, set(self.names) | set(files))
                self._set_mode(staging)
            except (OSError, OutputError) as exc:
                reason = f"{exc.strerror} ({exc.filename})" if isinstance(
                    exc, OSError) and exc.strerror else str(exc)
                raise OutputError(f"cannot write the outputs: {reason}; nothing was changed "
                                  f"in {out}") from exc
            with interrupts.deferred():
                _pause()
                try:
                    self._swap(staging)
                except OSError as exc:
                    raise OutputError(f"cannot move the outputs into {out}: {exc.strerror or exc}"
                                      "; nothing was changed in it") from exc
                self.committed = True
                _pause()
                shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old set
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_all(self, staging: Path, files: dict) -> None:
        def write(name, writer):
            writer(str(staging / name))
            check_written(staging / name)
            _pause()

        *parallel, last = files.items()
        pool = ThreadPoolExecutor(max_workers=4)
        try:
            for job in [pool.submit(write, *item) for item in parallel]:
                job.result()  # re-raises the first failure
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        write(*last)

    def _carry_over(self, staging: Path, ours: set) -> None:
        """Link the folder's entries that this command does not write into ``staging``."""
        if not self.path.is_dir():
            return
        for entry in self.path.iterdir():
            if entry.name in ours:
                continue
            target = staging / entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(entry), target)
            elif entry.is_dir():
                shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, target)
        _pause()

    def _set_mode(self, staging: Path) -> None:
        """The folder keeps its permissions (mkdtemp makes 0700); a new one gets the umask's."""
        if self.path.is_dir():
            mode = stat.S_IMODE(self.path.stat().st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o777 & ~umask
        os.chmod(staging, mode)

    def _swap(self, staging: Path) -> None:
        out = self.path
        if not out.exists():
            os.rename(staging, out)
        elif not _exchange(staging, out):
            aside = out.parent / f"{self._prefix('old')}{os.getpid()}"
            os.rename(out, aside)
            try:
                _pause()
                os.rename(staging, out)
            except BaseException:
                os.rename(aside, out)
                raise
            _pause()
            shutil.rmtree(aside, ignore_errors=True)
