"""Node-local database storage: stage ``<db_dir>/data`` in, copy it back atomically.

Run by the database job on the database's node with the role's Python (the
container image's when there is one; standard library only), from a copy of
this file in the job's private node-local directory::

    python db_storage.py stage-in  --db-dir DB_DIR --job-dir JOB_DIR --node NODE
    python db_storage.py copy-back --db-dir DB_DIR --job-dir JOB_DIR --node NODE [--swap auto|exchange|rename]
    python db_storage.py recover   --db-dir DB_DIR

``JOB_DIR`` is a fresh 0700 directory under the node-local directory (the job
script makes it with ``mktemp -d``); the server runs on ``JOB_DIR/data``.

stage-in
    Finishes or undoes an interrupted copy-back first (see *recover*), and
    refuses to start while ``<db_dir>/node-local.json`` says that a server
    ran on a node-local copy that did not come back (the job was killed in
    its copy-back, the node failed): ``data`` is older than those files. It
    checks that ``<db_dir>/data`` fits in the node-local file system with room
    to grow, copies it to ``JOB_DIR/data`` and checks the copy (the size and
    SHA-256 of every file) against ``<db_dir>/data``, and writes
    ``node-local.json`` (job, node, path), which the copy-back that swaps
    this copy in removes. Any failure removes the partial copy, prints one
    line ``mspass_cluster: stage-in failed: ...`` and exits 1: the server
    does not start.
copy-back
    Run once the server exited, however it ended (what is on disk is what the
    server recovers from at its next start). Signals that end jobs (TERM, INT,
    HUP) are ignored from here on: only SIGKILL stops it. It copies
    ``JOB_DIR/data`` to a fresh ``<db_dir>/data.new-<id>`` beside the old copy,
    reads every file of the new copy back from storage and compares its size
    and SHA-256 with the node-local file, marks the copy complete (a file
    ``.mspass_cluster-complete`` inside it), and swaps it in: with
    ``renameat2(RENAME_EXCHANGE)``, one atomic step, where the file system
    has it (ext4, XFS, Btrfs, tmpfs); otherwise with two renames
    (``data`` -> ``data.old-<id>``, ``data.new-<id>`` -> ``data``), between
    which ``data`` is briefly absent, and which the next *recover* completes
    if the job is killed between them. The old copy is removed only after the
    swap, ``JOB_DIR`` only after a successful copy-back. If the copy-back
    cannot finish, ``<db_dir>/data`` is the previous complete copy, the
    partial copy is removed, ``JOB_DIR`` stays, and one line
    ``mspass_cluster: copy-back failed: ...`` says what failed and where the
    newer files are (``NODE:JOB_DIR/data``); exit 1.
recover
    Makes ``<db_dir>`` hold exactly one complete ``data`` again after a
    copy-back was killed: a copy marked complete that was not swapped in yet
    is swapped in (it is newer); a ``data`` missing between the two renames is
    completed; unmarked (partial) new copies and old copies are removed.
    stage-in runs it first (a database on ``<db_dir>/data`` itself refuses to
    start while a complete copy waits beside it); by hand, it needs no job.

Every line this script prints starts with ``mspass_cluster:`` and goes to
standard error (the job's log); the exit status says whether it succeeded.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

#: Inside a copy whose every file was checked: the copy is complete (removed once it is ``data``).
MARKER = ".mspass_cluster-complete"
#: Beside ``data`` while a server runs on a node-local copy, until that copy is back: where the newest data are.
LEASE = "node-local.json"
NEW_PREFIX = "data.new-"
OLD_PREFIX = "data.old-"
CHUNK = 8 * 2**20
#: Files copied at once: parallel file systems (Lustre, GPFS) are faster with several streams.
THREADS = 4
#: Room to grow the node-local copy must have, in percent of the data.
GROWTH_PERCENT = 10
#: renameat2's flag, from <linux/fs.h>, and its system call number where libc lacks the wrapper (glibc < 2.28).
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "ppc64": 357, "s390x": 347}


class StorageError(Exception):
    """Why a step could not be done; ``str()`` is the clause that follows ``failed:``."""

    #: False when ``<db_dir>/data`` itself is not the previous complete copy any more (a swap cut in two).
    previous_intact = True


def say(text: str) -> None:
    """One line of the job's log."""
    print(f"mspass_cluster: {text}", file=sys.stderr, flush=True)


def human(size: int) -> str:
    """``'17 B'``, ``'1.5 GiB'``."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def os_error(doing: str, exc: OSError) -> StorageError:
    """``'writing /x: No space left on device'``."""
    where = f" {exc.filename}" if exc.filename is not None else ""
    return StorageError(f"{doing}{where}: {exc.strerror or exc}")


# ------------------------------------------------------------------ trees
def inventory(root: str) -> dict:
    """Every entry under ``root`` (relative path -> kind and facts), the marker left out.

    ``("dir",)``, ``("link", target)`` or ``("file", size, mtime_ns)``.

    Raises
    ------
    StorageError
        For a special file (socket, FIFO, device), which a database directory never holds.
    """
    entries = {}

    def walk(relative: str) -> None:
        path = os.path.join(root, relative) if relative else root
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:
            raise os_error("reading the directory", exc) from exc
        for entry in children:
            if not relative and entry.name == MARKER:
                continue
            name = os.path.join(relative, entry.name) if relative else entry.name
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                entries[name] = ("link", os.readlink(entry.path))
            elif stat.S_ISDIR(info.st_mode):
                entries[name] = ("dir",)
                walk(name)
            elif stat.S_ISREG(info.st_mode):
                entries[name] = ("file", info.st_size, info.st_mtime_ns)
            else:
                raise StorageError(f"{entry.path} is not a file, directory or link; move it out of the data directory")

    walk("")
    return entries


def data_bytes(entries: dict) -> int:
    return sum(e[1] for e in entries.values() if e[0] == "file")


def file_count(entries: dict) -> int:
    return sum(1 for e in entries.values() if e[0] == "file")


def _drop_cache(fd: int) -> None:
    # So that reading the copy back checks what storage holds, not the page cache.
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def copy_file(source: str, target: str) -> tuple:
    """Copy one file, fsync it; return ``(size, sha256)`` of what was read from ``source``."""
    digest = hashlib.sha256()
    size = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        src = open(source, "rb", buffering=0)
    except OSError as exc:
        raise os_error("reading", exc) from exc
    with src:
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode | 0o600)
        except OSError as exc:
            raise os_error("creating", exc) from exc
        try:
            while True:
                try:
                    count = src.readinto(buffer)
                except OSError as exc:
                    exc.filename = source
                    raise os_error("reading", exc) from exc
                if not count:
                    break
                digest.update(view[:count])
                written = 0
                while written < count:
                    try:
                        written += os.write(fd, view[written:count])
                    except OSError as exc:
                        exc.filename = target
                        raise os_error("writing", exc) from exc
                size += count
            try:
                os.fsync(fd)
            except OSError as exc:
                exc.filename = target
                raise os_error("flushing (fsync)", exc) from exc
            _drop_cache(fd)
        finally:
            os.close(fd)
    try:
        os.chmod(target, mode)
        shutil.copystat(source, target, follow_symlinks=False)
    except OSError as exc:
        raise os_error("setting the mode and times of", exc) from exc
    return size, digest.hexdigest()


def file_digest(path: str) -> tuple:
    """``(size, sha256)`` of a file as storage returns it."""
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb", buffering=0) as f:
            _drop_cache(f.fileno())
            buffer = bytearray(CHUNK)
            view = memoryview(buffer)
            while True:
                count = f.readinto(buffer)
                if not count:
                    break
                digest.update(view[:count])
                size += count
    except OSError as exc:
        raise os_error("reading back", exc) from exc
    return size, digest.hexdigest()


def fsync_directory(path: str) -> None:
    """Make a directory's entries (new names, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise os_error("opening the directory", exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems refuse fsync on directories (EINVAL); their renames are durable on their own terms.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            exc.filename = path
            raise os_error("flushing (fsync) the directory", exc) from exc
    finally:
        os.close(fd)


def in_parallel(function, names: list) -> dict:
    """``{name: function(name)}``, ``THREADS`` at a time; the first failure (or a signal) stops the rest."""
    pool = ThreadPoolExecutor(THREADS)
    try:
        return dict(zip(names, pool.map(function, names)))
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except TypeError:  # Python < 3.9: the files already queued are done first
            pool.shutdown(wait=True)


def copy_tree(source: str, target: str) -> dict:
    """Copy ``source`` to the new directory ``target``, check it, and return the checked manifest.

    Every file is fsynced, its cached pages dropped, then read back and
    compared (size and SHA-256) with what was read from ``source``; the
    entries of both trees must be the same, and no file of ``source`` may
    have changed meanwhile (a server still writing there).

    Raises
    ------
    StorageError
        Naming what failed and the path.
    """
    entries = inventory(source)
    try:
        os.mkdir(target, 0o700)
    except OSError as exc:
        raise os_error("creating", exc) from exc
    directories = [""] + sorted(name for name, e in entries.items() if e[0] == "dir")
    for name in directories[1:]:
        try:
            os.mkdir(os.path.join(target, name), 0o700)
        except OSError as exc:
            raise os_error("creating", exc) from exc
    for name, entry in entries.items():
        if entry[0] == "link":
            try:
                os.symlink(entry[1], os.path.join(target, name))
            except OSError as exc:
                raise os_error("creating the link", exc) from exc
    files = sorted(name for name, e in entries.items() if e[0] == "file")
    copied = in_parallel(lambda n: copy_file(os.path.join(source, n), os.path.join(target, n)), files)
    for name in reversed(directories):
        try:
            shutil.copystat(os.path.join(source, name), os.path.join(target, name), follow_symlinks=False)
        except OSError as exc:
            raise os_error("setting the mode and times of", exc) from exc
        fsync_directory(os.path.join(target, name))
    for name, (size, _) in copied.items():
        if size != entries[name][1]:
            raise StorageError(
                f"{os.path.join(source, name)} changed size while it was copied; is a server still using {source}?"
            )
    again = inventory(source)
    if again != entries:
        changed = sorted(set(again.items()) ^ set(entries.items()))[0][0]
        raise StorageError(
            f"{os.path.join(source, changed)} changed while it was copied; is a server still using {source}?"
        )
    verify_tree(target, entries, copied)
    return copied


def verify_tree(target: str, entries: dict, copied: dict) -> None:
    """``target`` holds exactly ``entries``, each file with the size and SHA-256 in ``copied``."""
    found = inventory(target)
    if set(found) != set(entries):
        extra, missing = sorted(set(found) - set(entries)), sorted(set(entries) - set(found))
        raise StorageError(f"the copy {target} differs from its source: extra {extra[:3]}, missing {missing[:3]}")
    for name, entry in found.items():
        if entry[0] != entries[name][0] or (entry[0] == "link" and entry[1] != entries[name][1]):
            raise StorageError(f"the copy {os.path.join(target, name)} is not what its source is ({entries[name][0]})")
    files = sorted(copied)
    digests = in_parallel(lambda n: file_digest(os.path.join(target, n)), files)
    for name in files:
        if digests[name] != copied[name]:
            (size, _), (want_size, _) = digests[name], copied[name]
            what = f"{size} bytes instead of {want_size}" if size != want_size else "another SHA-256 than its source"
            raise StorageError(f"the copy {os.path.join(target, name)} reads back with {what}")


def remove_tree(path: str) -> str | None:
    """Remove ``path`` (a directory or file); the error in words, or None."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{exc.filename or path}: {exc.strerror or exc}"
    return None


def free_bytes(path: str) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


# ------------------------------------------------------------------ swapping
def _renameat2():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is not None:
        return lambda a, b: function(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
    number = _RENAMEAT2_SYSCALL.get(platform.machine())
    if number is None:
        return None
    return lambda a, b: libc.syscall(number, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)


def exchange(first: str, second: str) -> bool:
    """Swap two existing paths atomically (``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        call = _renameat2()
    except OSError:
        return False
    if call is None:
        return False
    if call(os.fsencode(first), os.fsencode(second)) == 0:
        return True
    code = ctypes.get_errno()
    # ENOSYS: old kernel; EINVAL: the file system does not do it (NFS, Lustre, GPFS...); ENOTSUP likewise.
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), first)


def write_marker(copy: str, facts: dict) -> None:
    path = os.path.join(copy, MARKER)
    try:
        with open(path, "w") as f:
            json.dump(facts, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise os_error("writing the completeness mark", exc) from exc
    fsync_directory(copy)


def read_marker(copy: str) -> dict | None:
    try:
        with open(os.path.join(copy, MARKER)) as f:
            facts = json.load(f)
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) else None


def clear_marker(copy: str) -> None:
    try:
        os.unlink(os.path.join(copy, MARKER))
    except FileNotFoundError:
        return
    fsync_directory(copy)


def write_lease(db_dir: str, facts: dict) -> None:
    """Record, beside ``data``, that the newest data will be on a node (``facts``: job, node, path)."""
    path = os.path.join(db_dir, LEASE)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(facts, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
    except OSError as exc:
        raise os_error("writing", exc) from exc
    fsync_directory(db_dir)


def read_lease(db_dir: str) -> dict | None:
    try:
        with open(os.path.join(db_dir, LEASE)) as f:
            facts = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def release_lease(db_dir: str, source: str) -> None:
    """Remove the lease if it is the one of ``source``, the node-local copy that is now ``data``."""
    lease = read_lease(db_dir)
    if lease is not None and lease.get("path") == source:
        os.unlink(os.path.join(db_dir, LEASE))
        fsync_directory(db_dir)


def refuse_an_unfinished_lease(db_dir: str) -> None:
    """StorageError when a server ran on a node-local copy that did not come back: ``data`` is older."""
    lease = read_lease(db_dir)
    if lease is None:
        return
    where = f"{lease.get('node', '?')}:{lease.get('path', '?')}"
    job_dir = os.path.dirname(str(lease.get("path", "?")))
    command = shlex.join(
        ["python3", os.path.join(job_dir, "db_storage.py"), "copy-back", "--db-dir", db_dir, "--job-dir", job_dir]
    )
    raise StorageError(
        f"job {lease.get('job', '?')} ran the database on {where} and its copy-back did not finish, so "
        f"{os.path.join(db_dir, 'data')} may be older than those files. Copy them back first, from a job on that "
        f"node: srun --nodelist={lease.get('node', '?')} {command} --node {lease.get('node', '?')}; or, if they "
        f"are lost (the node failed), remove {os.path.join(db_dir, LEASE)} to start from the older copy"
    )


def swap_in(db_dir: str, new: str, how: str = "auto") -> str:
    """Make the complete copy ``new`` (marked) ``<db_dir>/data``; remove the old one; say how.

    ``how``: ``exchange`` (renameat2 only), ``rename`` (two renames only) or
    ``auto`` (the first where the file system has it).
    """
    data = os.path.join(db_dir, "data")
    if not os.path.lexists(data):
        os.rename(new, data)
        fsync_directory(db_dir)
        release_lease(db_dir, str((read_marker(data) or {}).get("source")))
        clear_marker(data)
        return "a rename (there was no previous copy)"
    if how != "rename" and exchange(new, data):
        fsync_directory(db_dir)
        old, method = new, "renameat2(RENAME_EXCHANGE), one atomic step"
    elif how == "exchange":
        raise StorageError(f"the file system of {db_dir} cannot exchange two directories atomically (renameat2)")
    else:
        old = os.path.join(db_dir, OLD_PREFIX + os.path.basename(new)[len(NEW_PREFIX) :])
        os.rename(data, old)
        fsync_directory(db_dir)
        try:
            os.rename(new, data)
        except OSError:
            os.rename(old, data)
            fsync_directory(db_dir)
            raise
        fsync_directory(db_dir)
        method = "two renames" + (" (no atomic exchange on this file system)" if how == "auto" else "")
    # Before the mark goes: a job killed in between leaves a marked data, which tells recover() to release it.
    release_lease(db_dir, str((read_marker(data) or {}).get("source")))
    try:
        clear_marker(data)
    except (OSError, StorageError) as exc:
        say(f"could not remove the completeness mark in {data} ({exc}); the next start removes it")
    problem = remove_tree(old)
    if problem:
        say(f"could not remove the previous copy {old} ({problem}); remove it yourself")
    return method


def recover(db_dir: str, how: str = "auto") -> list:
    """Leave ``<db_dir>`` with one complete ``data`` after an interrupted copy-back; what was done, in words.

    Raises
    ------
    StorageError
        When what is there cannot be told apart safely (two complete new
        copies; a complete new copy older than files of ``data``).
    """
    data = os.path.join(db_dir, "data")
    done = []
    try:
        names = sorted(os.listdir(db_dir))
    except FileNotFoundError:
        return done
    except OSError as exc:
        raise os_error("reading the directory", exc) from exc
    news = [os.path.join(db_dir, n) for n in names if n.startswith(NEW_PREFIX)]
    olds = [os.path.join(db_dir, n) for n in names if n.startswith(OLD_PREFIX)]
    complete = [n for n in news if os.path.isdir(n) and read_marker(n) is not None]
    if len(complete) > 1:
        raise StorageError(
            f"{db_dir} holds several complete new copies ({', '.join(map(os.path.basename, complete))}) and cannot "
            "tell which is the newest; keep the one you want as data and remove the others"
        )
    if os.path.isdir(data) and read_marker(data) is not None:
        release_lease(db_dir, str(read_marker(data).get("source")))
        clear_marker(data)
        done.append(f"{data} was swapped in; its completeness mark is removed")
    if complete:
        new = complete[0]
        facts = read_marker(new)
        if os.path.isdir(data):
            newest = max((e[2] for e in inventory(data).values() if e[0] == "file"), default=0)
            if newest / 1e9 > float(facts.get("verified", 0)):
                raise StorageError(
                    f"{new} is a complete copy made by job {facts.get('job')} that was not swapped in, but {data} "
                    "was written after it; keep the one you want as data and remove the other"
                )
        method = swap_in(db_dir, new, how)
        news.remove(new)
        done.append(f"swapped in {new}, the complete copy of job {facts.get('job')}, with {method}")
    elif not os.path.lexists(data) and olds:
        if len(olds) > 1:
            raise StorageError(
                f"{data} is missing and {db_dir} holds several old copies; rename the one you want to data"
            )
        os.rename(olds[0], data)
        fsync_directory(db_dir)
        olds = []
        done.append(f"{data} was missing: renamed the previous copy back")
    for leftover in news + olds:
        if os.path.lexists(leftover):
            problem = remove_tree(leftover)
            kind = (
                "a copy not marked complete (partial, or the old one after a swap)"
                if leftover in news
                else "an old copy"
            )
            done.append(f"removed {leftover}, {kind}")
            if problem:
                raise StorageError(f"cannot remove {problem}")
    return done


# ------------------------------------------------------------------ the commands
def stage_in(db_dir: str, job_dir: str, node: str, job: str = "") -> str:
    """Copy ``<db_dir>/data`` to ``<job_dir>/data``, checked; return that path."""
    for line in recover(db_dir):
        say(f"recovered an interrupted copy-back: {line}")
    refuse_an_unfinished_lease(db_dir)
    source = os.path.join(db_dir, "data")
    if not os.path.isdir(source):
        try:
            os.makedirs(source, 0o700)
        except OSError as exc:
            raise os_error("creating", exc) from exc
    entries = inventory(source)
    size = data_bytes(entries)
    need = size + size * GROWTH_PERCENT // 100
    free = free_bytes(job_dir)
    if free < need:
        raise StorageError(
            f"{source} holds {human(size)} but the node-local directory {os.path.dirname(job_dir)} on {node} has "
            f"{human(free)} free, less than those {human(size)} plus {GROWTH_PERCENT} % to grow ({human(need)}). "
            "Give db_local_dir a node-local directory with more room, ask Slurm for nodes with enough local disk "
            "(e.g. db_extra_directives=['--tmp=...']), or keep the database on db_dir (db_storage='shared')"
        )
    target = os.path.join(job_dir, "data")
    say(f"stage-in started: {source} to {node}:{target} ({file_count(entries)} files, {human(size)})")
    started = time.monotonic()
    try:
        copy_tree(source, target)
        write_lease(db_dir, {"job": job, "node": node, "path": target, "since": time.time()})
    except BaseException:
        remove_tree(target)
        raise
    say(
        f"stage-in done: {node}:{target} is the server's copy of {source} "
        f"({file_count(entries)} files, {human(size)}, {time.monotonic() - started:.1f} s)"
    )
    return target


def copy_back(db_dir: str, job_dir: str, node: str, how: str = "auto", job: str = "") -> str:
    """Copy ``<job_dir>/data`` back over ``<db_dir>/data`` atomically; say how it went."""
    source = os.path.join(job_dir, "data")
    data = os.path.join(db_dir, "data")
    entries = inventory(source)
    size = data_bytes(entries)
    say(f"copy-back started: {node}:{source} to {data} ({file_count(entries)} files, {human(size)})")
    started = time.monotonic()
    free = free_bytes(db_dir)
    if free < size:
        raise StorageError(f"{db_dir} has {human(free)} free, the new copy needs {human(size)}")
    try:
        new = tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{job or 'x'}.", dir=db_dir)
        os.rmdir(new)  # copy_tree makes it again, with the source's mode
    except OSError as exc:
        raise StorageError(f"creating a directory in {db_dir}: {exc.strerror or exc}") from exc
    try:
        copy_tree(source, new)
        write_marker(new, {"job": job, "node": node, "source": source, "verified": time.time()})
        fsync_directory(db_dir)
    except BaseException:
        remove_tree(new)
        raise
    say(f"copy-back verified: {new} is a complete copy of {node}:{source}; swapping it in")
    try:
        method = swap_in(db_dir, new, how)
    except (OSError, StorageError) as exc:
        error = exc if isinstance(exc, StorageError) else os_error("swapping in", exc)
        if not os.path.isdir(data):
            # Both renames failed halfway (a file system gone read-only between them): the next start finishes it.
            error.previous_intact = False
            raise error from exc
        if os.path.isdir(new) and read_marker(data) is None:
            remove_tree(new)
        raise error from exc
    say(
        f"copy-back done: {data} is the copy of {node}:{source} ({file_count(entries)} files, {human(size)}, "
        f"{time.monotonic() - started:.1f} s; swapped with {method})"
    )
    problem = remove_tree(job_dir)
    if problem and os.path.lexists(source):
        say(f"could not remove the node-local copy {source} ({problem}); remove it yourself")
    # Left empty in a container, where the job directory is a mount point: the job script removes it.
    return method


def parse_arguments(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="db_storage.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("stage-in", "copy-back", "recover"):
        command = commands.add_parser(name)
        command.add_argument("--db-dir", required=True, help="the shared database directory; the data are DB_DIR/data")
        command.add_argument("--swap", choices=("auto", "exchange", "rename"), default="auto")
        if name != "recover":
            command.add_argument("--job-dir", required=True, help="the job's private node-local directory")
            command.add_argument("--node", required=True, help="this node's name, for messages")
            command.add_argument("--job", default="", help="the job's id, in names and messages")
    return parser.parse_args(argv)


def main(argv: list) -> int:
    args = parse_arguments(argv)
    db_dir = os.path.abspath(args.db_dir)
    if args.command == "recover":
        try:
            for line in recover(db_dir, args.swap):
                say(f"recovered an interrupted copy-back: {line}")
        except (StorageError, OSError) as exc:
            say(f"recovery of an interrupted copy-back failed: {exc}")
            return 1
        return 0
    job_dir = os.path.abspath(args.job_dir)
    if args.command == "stage-in":
        signal.signal(signal.SIGTERM, _interrupted)
        try:
            stage_in(db_dir, job_dir, args.node, args.job)
        except (StorageError, OSError, KeyboardInterrupt) as exc:
            reason = "stopped by a signal" if isinstance(exc, KeyboardInterrupt) else str(exc)
            say(f"stage-in failed: {reason}. The database did not start; {db_dir}/data is unchanged.")
            return 1
        return 0
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1"):
        # The job is ending: finish the copy (only SIGKILL, KillWait seconds later, can stop it).
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        copy_back(db_dir, job_dir, args.node, args.swap, args.job)
    except (StorageError, OSError) as exc:
        where = f"{args.node}:{os.path.join(job_dir, 'data')}"
        if getattr(exc, "previous_intact", True):
            state = f"{db_dir}/data is the previous complete copy; the newer files are on {where}"
            again = shlex.join(
                [
                    "python3",
                    os.path.join(job_dir, "db_storage.py"),
                    "copy-back",
                    "--db-dir",
                    db_dir,
                    "--job-dir",
                    job_dir,
                ]
            )
            fix = (
                f"once that is fixed, and before the database starts again, copy them back from a job on "
                f"{args.node}: srun --nodelist={args.node} {again} --node {args.node}"
            )
        else:
            state = (
                f"{db_dir}/data is missing until the next start of the database swaps in the complete new copy "
                f"beside it; the newer files are also on {where}"
            )
            fix = "fix the file system, then start the database again"
        say(f"copy-back failed: {exc}. {state} ({fix}; see the README, Node-local database)")
        return 1
    return 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
