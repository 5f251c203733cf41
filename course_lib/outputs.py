"""What a command writes: every output planned and checked before the work starts, then written without losing a file
the user owns (never over an input or another output, never over an existing file without --force, never over a file
that appeared while the command ran, and one command at a time per file)."""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def _key(path: Path) -> str:
    return os.path.normcase(os.path.realpath(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def writable_folder(path: Path, what: str) -> None:
    """Refuse (ValueError) an output whose folder cannot be created or written, before any work is spent on it."""
    folder = path.parent
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the {what} {path}: {existing} is a file, not a folder")
    try:  # a file written and removed there: catches a read-only folder, disk or mount alike
        import tempfile

        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the {what} {path}: the folder {existing} is not writable "
                         f"({e.strerror or e})") from None


class Plan:
    """The files one command reads and writes. `output` checks each as it is named; `claim` (a context manager) takes
    a lock beside every output for the command's duration, so a second command writing the same file is refused at its
    start, and removes the temporary files of an earlier killed write."""

    def __init__(self, force: bool = False):
        self.force = force
        self.inputs: dict[str, tuple[str, Path]] = {}
        self.outputs: dict[str, tuple[str, Path]] = {}
        self._locks: list[Path] = []

    def input(self, path, what: str) -> Path:
        path = Path(path)
        self.inputs[_key(path)] = (what, path)
        clash = self.outputs.get(_key(path))
        if clash:
            raise ValueError(f"the {clash[0]} would be written over the {what} ({path}): choose another name")
        return path

    def output(self, path, what: str, may_exist: bool = False) -> Path:
        """Name an output (`may_exist`: a file this command updates in place, such as a resumable state)."""
        if str(path).endswith(("/", os.sep)):
            raise ValueError(f"the {what} {path} names a folder; give a file name")
        path = Path(path)
        key = _key(path)
        if key in self.outputs:
            raise ValueError(f"the {self.outputs[key][0]} and the {what} would both be written to {path}: "
                             "choose different names")
        if key in self.inputs:
            raise ValueError(f"the {what} would be written over the {self.inputs[key][0]} ({path}): "
                             "choose another name")
        if path.is_dir():
            raise ValueError(f"the {what} {path} is a folder; give a file name")
        if path.exists() and not (self.force or may_exist):
            raise ValueError(f"{path} exists (it would be the {what}); pass --force to replace it, or choose another "
                             "name")
        writable_folder(path, what)
        self.outputs[key] = (what, path)
        return path

    def __enter__(self) -> Plan:
        return self.claim()

    def claim(self) -> Plan:
        if self._locks:  # already held (claim() then `with`)
            return self
        me = f"{socket.gethostname()} {os.getpid()}"
        try:
            for _, path in self.outputs.values():
                path.parent.mkdir(parents=True, exist_ok=True)
                lock = path.with_name(f".{path.name}.lock")
                for _ in range(2):
                    try:
                        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        if _stale(lock):
                            lock.unlink(missing_ok=True)
                            continue
                        raise ValueError(f"another command is writing {path} ({_describe(lock)}); wait for it, or "
                                         f"delete {lock} if it is no longer running") from None
                    with os.fdopen(fd, "w") as f:
                        f.write(me + "\n")
                    self._locks.append(lock)
                    break
                for old in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
                    old.unlink(missing_ok=True)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        for lock in self._locks:
            lock.unlink(missing_ok=True)
        self._locks.clear()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(lock: Path) -> str:
    try:
        host, pid = lock.read_text().split()
        return f"process {pid} on {host}"
    except (OSError, ValueError):
        return "a process"


def _stale(lock: Path) -> bool:
    """A lock whose process ended (killed): safe to take over. A lock from another host is never taken over."""
    try:
        host, pid = lock.read_text().split()
        return host == socket.gethostname() and not _alive(int(pid))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False


def default_mode() -> int:
    """The permissions a new file would get (mkstemp's files are private, 0600, otherwise)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def publish(tmp, path: Path, replace: bool, keep: bool = False) -> None:
    """Give the finished temporary file its name: over an existing file only with replace=True; otherwise refuse one
    that appeared while this command ran (a hard link is atomic and fails if the name exists), and with keep=True
    keep this run's result beside it as NAME.new.EXT."""
    os.chmod(tmp, default_mode())
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        kept = _beside(tmp, path) if keep else None
        raise FileExistsError(f"{path} appeared while this command ran (another run?): it was not replaced"
                              + (f"; this run's result is {kept}" if kept else "")) from None
    except OSError:  # a filesystem without hard links: claim the name exclusively, then fill it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def names_beside(path: Path):
    """The names for a file kept beside `path` when its own name is taken: NAME.new.EXT, NAME.new-2.EXT, ..."""
    for k in range(1, 100):
        yield path.with_name(f"{path.stem}.new{'' if k == 1 else f'-{k}'}{path.suffix}")


def _beside(tmp, path: Path) -> Path | None:
    """Keep a result whose name was taken under the first free name of `names_beside`, never over a file."""
    for alt in names_beside(path):
        try:
            os.link(tmp, alt)
            return alt
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def write_then_publish(write, path, replace: bool) -> Path:
    """`write(tmp)` writes the whole file at a temporary path beside `path`; then it gets its name as `publish` says
    (for exporters that write a path themselves)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        publish(tmp, path, replace, keep=True)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def no_space(path, error: BaseException) -> OSError | None:
    """The clear error for a write that failed because the disk is full (torch reports it as "unexpected pos"), or
    None when the failure was something else."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not full and isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        try:
            import shutil

            full = shutil.disk_usage(Path(path).parent).free < 64 << 20
        except OSError:
            full = False
    if not full:
        return None
    return OSError(errno.ENOSPC, f"no space left on device while writing {path}: free some space and run it again "
                                 "(nothing was replaced)")
