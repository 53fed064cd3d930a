"""Output folders: the rules that keep a user's files safe, one run per output, atomic replacement.

Every command that writes a model (``compress``, ``finetune``) goes through :func:`claim_output`:

1. ``--out`` is resolved (``~``, symlinks) before any check, and must not be empty.
2. It may not be, contain or lie inside the source model, prunenet's cache or the Hugging Face cache;
   it may not be ``/``, the home folder, the current folder or one of its ancestors, nor a mount point.
3. An existing ``--out`` must be an empty folder, or — with ``overwrite`` — a folder prunenet wrote:
   one whose ``prunenet.json`` lists every entry in it. Anything else is refused, naming what is there.
   The manifest is trusted as the record of what prunenet wrote (a file added to it by hand is replaced).
4. One run per output: ``.NAME.lock`` beside ``--out`` is held (``flock``) for the whole run, so a
   second run on the same output is refused at once. The kernel drops the lock of a process that dies,
   so a killed run never blocks the next one. The lock is never opened through a link, and an entry of
   that name prunenet did not write is refused, never truncated or deleted (:class:`_RunLock`).
5. Everything is written into ``.NAME.partial-*`` beside ``--out`` and renamed into place when complete
   (:meth:`OutputFolder.write`); the folder being replaced is removed only once the new one is in place.
   Partial folders of dead runs (marked by :data:`PARTIAL_MARKER`, and matched by their whole name) are
   removed by the next run on that output, or resumed when they match its inputs. Intermediate results
   (``compress --recover``'s pruned model before recovery) go to a marked ``.NAME.stage-*`` folder beside
   it, removed at the end of the run. Every name a run creates is checked to fit the file system first.
6. Before any work, the parent is checked to be writable (by creating the lock) and to have room for
   the estimated output (:meth:`OutputFolder.ensure_space`).
7. Folders and files get the permissions the umask gives, like any other tool's output.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from .cache import cache_dir
from .checkpoint import MANIFEST_FILE, MANIFEST_FILES_KEY, PARTIAL_MARKER, read_manifest
from .tables import format_bytes

log = logging.getLogger(__name__)


class OutputFolderError(ValueError):
    """``--out`` is unsafe or impossible to write; the message says why and what to do."""


# -- the path rules ---------------------------------------------------------------------------------


def _protected_trees() -> list[tuple[Path, str]]:
    """Folders whose contents no output may replace: prunenet's cache and the Hugging Face cache."""
    trees = [(cache_dir(), "prunenet's model cache ($PRUNENET_CACHE)")]
    try:
        from huggingface_hub import constants

        trees.append((Path(constants.HF_HUB_CACHE), "the Hugging Face cache"))
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        pass
    return [(path.expanduser().resolve(), what) for path, what in trees]


def _protected_folders() -> list[tuple[Path, str]]:
    """Folders that may never *be* the output: ``/``, home, the current folder and its ancestors."""
    cwd = Path.cwd().resolve()
    folders = [(Path("/"), "the root folder"), (cwd, "the current folder")]
    folders += [(p, "a parent of the current folder") for p in cwd.parents]
    with contextlib.suppress(RuntimeError):  # no home folder known
        home = Path.home().resolve()
        folders += [(home, "your home folder"), *((p, "a parent of your home folder") for p in home.parents)]
    return folders


def _resolve(out: str) -> Path:
    """``out`` with ``~`` expanded and every symbolic link resolved, or :class:`OutputFolderError`."""
    try:
        return Path(out).expanduser().resolve()
    except RuntimeError as err:  # "Symlink loop from ..." (Python < 3.13), "Could not determine home directory"
        if "loop" in str(err).lower():
            raise OutputFolderError(f"--out {out} is a loop of symbolic links; name a real folder") from None
        raise OutputFolderError(f"--out {out}: {err}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputFolderError(f"--out {out} is a loop of symbolic links; name a real folder") from None
        raise


def _check_name_lengths(path: Path) -> None:
    """Every name a run creates beside ``path`` fits the file system: refused before any work, not after it.

    The longest is the resumable temporary folder ``.NAME.partial-<16 hex digits>``.
    """
    longest = f".{path.name}.partial-{'0' * _RESUME_TAG_LENGTH}"
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    extra = len(longest) - len(path.name)
    if len(os.fsencode(longest)) > name_max:
        raise OutputFolderError(
            f"the name of --out is too long: {len(os.fsencode(path.name))} bytes, and prunenet needs "
            f"{name_max - extra} at most on this file system to name its temporary folder beside it; choose a "
            "shorter name"
        )
    # A file inside the temporary folder ("model-00001-of-00002.safetensors.index.json" and the like).
    if len(os.fsencode(str(path.parent / longest))) + 64 > os.pathconf("/", "PC_PATH_MAX"):
        raise OutputFolderError(f"--out {path} is too long a path for the files prunenet writes in it")


def check_output_path(
    out: str | os.PathLike, sources: Sequence[str | os.PathLike] = (), teacher: str | os.PathLike | None = None
) -> Path:
    """Rules 1 and 2 (and the parent's existence): ``out`` resolved, or :class:`OutputFolderError`.

    ``sources``: the source model(s); ``teacher``: a model the run reads besides them (``finetune --teacher``).
    Pure checks, no writes: distributed ranks other than the writer call this alone.
    """
    text = os.fspath(out)
    if not text.strip():
        raise OutputFolderError("--out is empty: name the output folder, e.g. --out pruned-model")
    path = _resolve(text)
    for folder, what in _protected_folders():
        if path == folder:
            raise OutputFolderError(f"--out {path} is {what}; name a new folder for the output, e.g. {path / 'pruned'}")
    inputs = [(s, "the source model") for s in sources] + ([(teacher, "the teacher model")] if teacher else [])
    trees = [(_resolve(os.fspath(s)), what) for s, what in inputs] + _protected_trees()
    for tree, what in trees:
        if path == tree:
            raise OutputFolderError(f"--out {path} is {what}; choose a folder outside it")
        if tree in path.parents:
            raise OutputFolderError(f"--out {path} lies inside {what} {tree}; choose a folder outside it")
        if path in tree.parents:
            raise OutputFolderError(f"--out {path} contains {what} {tree}; choose a folder that does not")
    _check_name_lengths(path)
    if path.exists() and os.path.ismount(path):
        raise OutputFolderError(
            f"--out {path} is a mount point, which cannot be replaced by a rename; use a folder inside it, "
            f"e.g. {path / 'pruned'}"
        )
    if not path.parent.is_dir():
        raise OutputFolderError(f"the parent folder of --out does not exist: {path.parent}; create it first")
    return path


def _describe(entries: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _foreign_entries(folder: Path, entries: Sequence[str]) -> tuple[list[str], str | None]:
    """The entries of ``folder`` prunenet did not write, judged by its manifest, and why it is not ours."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return list(entries), f"there is no {MANIFEST_FILE}"
    try:
        listed = read_manifest(folder).get(MANIFEST_FILES_KEY)
    except (OSError, ValueError, AttributeError):
        return list(entries), f"its {MANIFEST_FILE} is not readable JSON"
    if not isinstance(listed, list):
        return list(entries), f"its {MANIFEST_FILE} lists no files (written by an older prunenet, or not by prunenet)"
    listed = set(map(str, listed))
    foreign = [e for e in entries if e not in listed or not (folder / e).is_file() or (folder / e).is_symlink()]
    return foreign, None


def check_existing_output(path: Path, overwrite: bool) -> None:
    """Rule 3: an existing ``path`` is an empty folder, or with ``overwrite`` a folder prunenet wrote."""
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputFolderError(f"--out {path} exists and is not a folder")
    entries = sorted(os.listdir(path))
    if not entries:
        return
    foreign, why = _foreign_entries(path, entries)
    if foreign:
        reason = why or f"its {MANIFEST_FILE} does not list them"
        raise OutputFolderError(
            f"--out {path} holds {_describe(foreign)}, which prunenet did not write ({reason}); --overwrite "
            "replaces only prunenet's own output: move those files away yourself, or choose another --out"
        )
    if not overwrite:
        raise OutputFolderError(f"--out {path} holds an earlier prunenet output; pass --overwrite to replace it")


# -- permissions and OS errors ----------------------------------------------------------------------


def _umask() -> int:
    try:  # Linux states it; os.umask can only read it by changing it, for every thread at once
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def match_umask(folder: Path) -> None:
    """Give ``folder`` and the files in it the permissions a plain ``mkdir``/``open`` would have.

    ``tempfile.mkdtemp`` makes folders 0700 and safetensors writes files 0600; a model written for a
    team (or a cache several containers share) must be readable as the umask allows.
    """
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def os_error_reason(err: OSError) -> str:
    """What an OS error means for the user, in plain words (with what to do where that is clear)."""
    return {
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "the operation is not permitted (an immutable file or folder?)",
        errno.ENOSPC: "no space left on the device (free some space, or choose an --out on another disk)",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EXDEV: "the rename crosses file systems",
        errno.EBUSY: "the file or folder is busy (a mount point?)",
    }.get(err.errno, err.strerror or str(err))


# -- the run lock -----------------------------------------------------------------------------------

#: What a lock file holds: its holder. A file of that name holding anything else is not prunenet's.
_LOCK_LINE = re.compile(r"pid \d+ on \S+ since \S+\n")


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _kind_of(mode: int) -> str:
    """What a file of this ``st_mode`` is, in the words of ``ls -l`` readers."""
    kinds = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket",
             stat.S_IFCHR: "device", stat.S_IFBLK: "device", stat.S_IFREG: "file"}  # fmt: skip
    return kinds.get(stat.S_IFMT(mode), "file")


class _RunLock:
    """An exclusive ``flock`` on ``path``, which names its holder (pid, host, start time).

    The file is never opened through a symbolic link, and an entry of that name that prunenet did not
    write (a user's file, a folder, a FIFO, a link planted in a shared folder) is never truncated or
    deleted: the run is refused, naming it. A new lock appears complete and already locked (written
    into an unnamed ``O_TMPFILE`` and linked into place; ``link(2)`` never follows or replaces an
    existing entry). A lock left by a run that died is taken over.
    """

    def __init__(self, path: Path, out: Path):
        self.path, self.out, self.fd = path, out, None

    def _holder(self) -> bytes:
        since = datetime.datetime.now().isoformat(timespec="seconds")
        return f"pid {os.getpid()} on {socket.gethostname() or 'localhost'} since {since}\n".encode()

    def _unwritable(self, err: OSError) -> OutputFolderError:
        return OutputFolderError(
            f"cannot write in {self.out.parent}, the parent of --out: {os_error_reason(err)}; choose a writable --out"
        )

    def _in_the_way(self, what: str) -> OutputFolderError:
        return OutputFolderError(
            f"{self.path} is in the way: prunenet names the lock of --out {self.out.name} so, and this {what} is not "
            "one it wrote; move it away, or choose another --out"
        )

    def acquire(self) -> None:
        # Each round is lost only to another run's lock appearing or vanishing between two system calls.
        for _ in range(1000):
            fd = self._create()
            if fd is None:
                fd = self._take_over()
            if fd is not None:
                self.fd = fd
                return
        raise OutputFolderError(f"cannot take the lock {self.path}: other runs keep creating and removing it")

    def _create(self) -> int | None:
        """A new lock file, written and locked, at ``path``; ``None`` when an entry of that name exists."""
        try:
            fd = os.open(self.out.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise self._unwritable(err) from None
            return self._create_in_place()  # a file system without unnamed files
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can open it yet
        os.pwrite(fd, self._holder(), 0)
        try:
            # linkat(2) with AT_SYMLINK_FOLLOW names the open file; os.link calls it only when given a dir_fd.
            folder = os.open(self.out.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(f"/proc/self/fd/{fd}", self.path.name, dst_dir_fd=folder, follow_symlinks=True)
            finally:
                os.close(folder)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno == errno.ENOENT and not os.path.exists("/proc/self/fd"):
                return self._create_in_place()  # no /proc to name the unnamed file by
            raise self._unwritable(err) from None
        return fd

    def _create_in_place(self) -> int | None:
        """:meth:`_create` where unnamed files are not available: created exclusively, then locked."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            return None
        except OSError as err:
            raise self._unwritable(err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run opened it between our create and our lock: it holds it now
            os.close(fd)
            return None
        os.pwrite(fd, self._holder(), 0)
        return fd

    def _take_over(self) -> int | None:
        """The existing lock file, if a run that has ended left it; ``None`` if it vanished meanwhile."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise self._in_the_way(_kind_of(st.st_mode))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:  # replaced by a link since the lstat
                raise self._in_the_way("symbolic link") from None
            raise self._unwritable(err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise OutputFolderError(
                f"another prunenet run ({holder}) is writing --out {self.out}; wait for it to finish, or choose "
                "another --out"
            ) from None
        text = os.pread(fd, 512, 0).decode(errors="replace")
        if not _same_file(self.path, fd):  # its holder removed it before unlocking it (see release): again
            os.close(fd)
            return None
        if not _LOCK_LINE.fullmatch(text):
            os.close(fd)
            raise self._in_the_way("file")
        log.info("the lock of a run that has ended (%s) was left behind: taken over", text.strip())
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._holder(), 0)
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.path, self.fd):  # never a file that took its place
                os.unlink(self.path)  # while still holding it: see _take_over()
        os.close(self.fd)
        self.fd = None


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed if a link) is the file open as ``fd``."""
    try:
        st, open_st = os.lstat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (open_st.st_dev, open_st.st_ino)


# -- the claimed output -----------------------------------------------------------------------------


#: The kinds of temporary folder a run makes beside ``--out``, and the tags that end their names: 8 random
#: hex digits, or 16 for a resumable write (a digest of its inputs). Names are matched in full, so the
#: clean-up of ``--out p`` never takes ``.p.old-1.partial-…``, the live folder of a run on ``--out p.old-1``.
_TEMPORARY = re.compile(r"(partial|old|stage)-([0-9a-f]{8}|[0-9a-f]{16})")
_RESUME_TAG_LENGTH = 16


def partial_folder(out: Path, resume: str) -> Path:
    """The temporary folder of a resumable write of ``out`` (named after a digest of its inputs)."""
    return out.parent / f".{out.name}.partial-{resume}"


def _is_ours(folder: Path) -> bool:
    """Whether ``folder`` is a folder prunenet made for a run (not a link; its marker a plain file)."""
    try:
        return stat.S_ISDIR(os.lstat(folder).st_mode) and stat.S_ISREG(os.lstat(folder / PARTIAL_MARKER).st_mode)
    except OSError:
        return False


def _drop_all_but_files(folder: Path) -> None:
    """Remove what a write never leaves in its folder (links, folders, FIFOs): a resumed write opens its
    files by name, and must never write through a link someone placed there to a file outside it."""
    for entry in os.scandir(folder):
        if entry.is_symlink() or not entry.is_file():
            log.info("removing %s from the interrupted write: not a file prunenet wrote", entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class OutputFolder:
    """An output folder claimed for this run (see :func:`claim_output`); write it with :meth:`write`.

    Attributes:
        path: the resolved output folder.
        overwrite: whether an earlier prunenet output there may be replaced.
    """

    def __init__(self, path: Path, overwrite: bool):
        self.path, self.overwrite = path, overwrite
        self._staged: set[Path] = set()  # this run's staging folders: not leftovers while it holds them

    def _leftovers(self) -> list[Path]:
        """Temporary folders of earlier runs on this output (marked: ours to remove)."""
        prefix = f".{self.path.name}."
        found = []
        with contextlib.suppress(OSError):
            with os.scandir(self.path.parent) as entries:
                found = [self.path.parent / e.name for e in entries
                         if e.name.startswith(prefix) and _TEMPORARY.fullmatch(e.name[len(prefix):])]  # fmt: skip
        return sorted(p for p in found if _is_ours(p) and p not in self._staged)

    def ensure_space(self, nbytes: int) -> None:
        """Refuse before any work when the output (at least ``nbytes``) clearly cannot fit.

        Space held by leftovers of earlier runs counts as free: they are removed (or resumed) first.
        """
        free = shutil.disk_usage(self.path.parent).free + sum(_folder_bytes(p) for p in self._leftovers())
        if nbytes > free:
            raise OutputFolderError(
                f"not enough free space for --out {self.path}: the output needs at least {format_bytes(nbytes)} "
                f"and {self.path.parent} has {format_bytes(free)} free; free some space or choose another --out"
            )

    def _new_temporary(self, kind: str) -> Path:
        """A fresh, marked ``.NAME.KIND-XXXXXXXX`` folder beside the output (umask permissions)."""
        while True:
            folder = self.path.parent / f".{self.path.name}.{kind}-{secrets.token_hex(4)}"
            try:
                folder.mkdir()
                break
            except FileExistsError:
                continue
        (folder / PARTIAL_MARKER).touch()
        return folder

    @contextlib.contextmanager
    def write(self, resume: str | None = None) -> Iterator[Path]:
        """Yield a temporary folder beside the output; when the block succeeds it becomes the output.

        The block must end by writing ``prunenet.json`` (:func:`~prunenet.checkpoint.write_manifest`): its
        list of every file is what lets a later ``--overwrite`` recognise the folder. On any error (Ctrl-C
        included) the temporary folder is removed and the old output is untouched.

        ``resume`` (a digest of the inputs) names the folder ``.NAME.partial-RESUME`` and reuses one a
        killed run left behind, so the same command finds what that run finished. Other leftovers of
        dead runs on this output are removed first.
        """
        keep = partial_folder(self.path, resume) if resume is not None else None
        for leftover in self._leftovers():
            if leftover != keep:
                log.info("removing %s, left behind by a run that did not finish", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        if keep is not None:
            if _is_ours(keep):
                log.info("resuming the interrupted write in %s", keep)
                _drop_all_but_files(keep)
            elif os.path.lexists(keep):
                raise OutputFolderError(
                    f"{keep} is in the way: prunenet names its temporary folder for --out {self.path.name} so, and "
                    "this one it did not make; move it away, or choose another --out"
                )
            else:
                keep.mkdir()
                (keep / PARTIAL_MARKER).touch()
            tmp = keep
        else:
            tmp = self._new_temporary("partial")
        try:
            yield tmp
            self._install(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """Yield a marked, empty ``.NAME.stage-XXXXXXXX`` folder beside the output for an intermediate result
        (e.g. the pruned model that ``compress --recover`` then fine-tunes), removed when the block ends.

        A killed run's staging folder is a leftover like a partial one: the next run on this output removes it.
        """
        folder = self._new_temporary("stage")
        self._staged.add(folder)
        try:
            yield folder
        finally:
            self._staged.discard(folder)
            shutil.rmtree(folder, ignore_errors=True)

    def _install(self, tmp: Path) -> None:
        """Check the manifest lists the folder, fix permissions, and rename ``tmp`` over the output."""
        (tmp / PARTIAL_MARKER).unlink()
        foreign, why = _foreign_entries(tmp, sorted(os.listdir(tmp)))
        if foreign:
            raise RuntimeError(f"internal error: {MANIFEST_FILE} in {tmp} does not list {foreign} ({why})")
        match_umask(tmp)
        # The output may have changed during the run (not by prunenet: we hold its lock). Check again.
        check_existing_output(self.path, self.overwrite)
        if not self.path.exists() or not any(self.path.iterdir()):
            os.replace(tmp, self.path)  # rename(2) replaces an empty folder atomically
            return
        old = self._new_temporary("old")
        os.replace(self.path, old / self.path.name)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            os.replace(old / self.path.name, self.path)  # put the old output back
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike,
    *,
    sources: Sequence[str | os.PathLike] = (),
    teacher: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Iterator[OutputFolder]:
    """Check ``out`` against every rule above and hold its lock for the ``with`` block (``sources``,
    ``teacher``: as for :func:`check_output_path`).

    Raises:
        OutputFolderError: before any work, with one line saying what is wrong and what to do.
    """
    path = check_output_path(out, sources, teacher)
    lock = _RunLock(lock_path(path), path)
    lock.acquire()
    try:
        check_existing_output(path, overwrite)  # under the lock: no other run changes it now
        yield OutputFolder(path, overwrite)
    finally:
        lock.release()
