"""Output folders: the rules that keep a user's files safe, one run per output, atomic replacement.

Every command that writes a model (``compress``, ``finetune``) goes through :func:`claim_output`:

1. ``--out`` is resolved (``~``, symlinks) before any check, and must not be empty.
2. It may not be, contain or lie inside the source model, prunenet's cache or the Hugging Face cache;
   it may not be ``/``, the home folder, the current folder or one of its ancestors, nor a mount point.
3. An existing ``--out`` must be an empty folder, or — with ``overwrite`` — a folder prunenet wrote:
   one whose ``prunenet.json`` lists every entry in it. Anything else is refused, naming what is there.
4. One run per output: ``.NAME.lock`` beside ``--out`` is held (``flock``) for the whole run, so a
   second run on the same output is refused at once. The kernel drops the lock of a process that dies,
   so a killed run never blocks the next one.
5. Everything is written into ``.NAME.partial-*`` beside ``--out`` and renamed into place when complete
   (:meth:`OutputFolder.write`); the folder being replaced is removed only once the new one is in place.
   Partial folders of dead runs (marked by :data:`PARTIAL_MARKER`) are removed by the next run on that
   output, or resumed when they match its inputs. Intermediate results (``compress --recover``'s pruned
   model before recovery) go to a marked ``.NAME.stage-*`` folder beside it, removed at the end of the run.
6. Before any work, the parent is checked to be writable (by creating the lock) and to have room for
   the estimated output (:meth:`OutputFolder.ensure_space`).
7. Folders and files get the permissions the umask gives, like any other tool's output.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import itertools
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from .checkpoint import MANIFEST_FILE, MANIFEST_FILES_KEY, PARTIAL_MARKER, read_manifest
from .tables import format_bytes

log = logging.getLogger(__name__)


class OutputFolderError(ValueError):
    """``--out`` is unsafe or impossible to write; the message says why and what to do."""


# -- the path rules ---------------------------------------------------------------------------------


def _protected_trees() -> list[tuple[Path, str]]:
    """Folders whose contents no output may replace: prunenet's cache and the Hugging Face cache."""
    from .models import cache_dir

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


def check_output_path(out: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Rules 1 and 2 (and the parent's existence): ``out`` resolved, or :class:`OutputFolderError`.

    Pure checks, no writes: distributed ranks other than the writer call this alone.
    """
    text = os.fspath(out)
    if not text.strip():
        raise OutputFolderError("--out is empty: name the output folder, e.g. --out pruned-model")
    path = Path(text).expanduser().resolve()
    for folder, what in _protected_folders():
        if path == folder:
            raise OutputFolderError(f"--out {path} is {what}; name a new folder for the output, e.g. {path / 'pruned'}")
    trees = [(Path(s).expanduser().resolve(), "the source model") for s in sources] + _protected_trees()
    for tree, what in trees:
        if path == tree:
            raise OutputFolderError(f"--out {path} is {what}; choose a folder outside it")
        if tree in path.parents:
            raise OutputFolderError(f"--out {path} lies inside {what} {tree}; choose a folder outside it")
        if path in tree.parents:
            raise OutputFolderError(f"--out {path} contains {what} {tree}; choose a folder that does not")
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


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


class _RunLock:
    """An exclusive ``flock`` on ``path``, which names its holder (pid, host, start time)."""

    def __init__(self, path: Path, out: Path):
        self.path, self.out, self.fd = path, out, None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                raise OutputFolderError(
                    f"cannot write in {self.out.parent}, the parent of --out: {os_error_reason(err)}; "
                    "choose a writable --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process"
                os.close(fd)
                raise OutputFolderError(
                    f"another prunenet run ({holder}) is writing --out {self.out}; wait for it to finish, or "
                    "choose another --out"
                ) from None
            # The previous holder unlinks the file before unlocking it: if that happened between our
            # open and our flock, we hold a lock on a file nobody else will open. Start again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = os.pread(fd, 512, 0).decode(errors="replace").strip()
        if stale:
            log.info("the lock of a run that has ended (%s) was left behind: taken over", stale)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: see acquire()
        os.close(self.fd)
        self.fd = None


# -- the claimed output -----------------------------------------------------------------------------


def partial_folder(out: Path, resume: str) -> Path:
    """The temporary folder of a resumable write of ``out`` (named after a digest of its inputs)."""
    return out.parent / f".{out.name}.partial-{resume}"


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
        name = glob.escape(self.path.name)
        found = [self.path.parent.glob(f".{name}.{kind}-*") for kind in ("partial", "old", "stage")]
        return sorted(
            p for p in itertools.chain(*found)
            if p.is_dir() and not p.is_symlink() and (p / PARTIAL_MARKER).is_file() and p not in self._staged
        )  # fmt: skip

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
            if keep.is_dir():
                log.info("resuming the interrupted write in %s", keep)
            keep.mkdir(exist_ok=True)
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
    out: str | os.PathLike, *, sources: Sequence[str | os.PathLike] = (), overwrite: bool = False
) -> Iterator[OutputFolder]:
    """Check ``out`` against every rule above and hold its lock for the ``with`` block.

    Raises:
        OutputFolderError: before any work, with one line saying what is wrong and what to do.
    """
    path = check_output_path(out, sources)
    lock = _RunLock(lock_path(path), path)
    lock.acquire()
    try:
        check_existing_output(path, overwrite)  # under the lock: no other run changes it now
        yield OutputFolder(path, overwrite)
    finally:
        lock.release()
