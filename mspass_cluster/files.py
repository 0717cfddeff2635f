"""Where a cluster's files go, and who else can touch them.

With ``security`` on (the default) what the cluster creates on disk is yours
alone, whatever your umask: directories 0700 and files 0600 (0750 and 0640
with ``group_access``), and nothing another user controls is used. Before
anything is submitted:

* no directory above a cluster directory (as written and with symlinks
  resolved) may be writable by every user without the sticky bit: anyone
  could rename what is below it and put their own in its place, job scripts
  included (refused). One your group can write without the sticky bit lets
  its members do the same: a warning, unless ``group_access`` says that you
  trust them;
* a directory's owner controls everything below it: one of another user's
  (not root's) is trusted where the site put it (a project directory in
  ``/project``), but not where every user can make one (``/tmp``,
  ``/scratch``): made there, it may be a trap (refused);
* ``work_dir`` may be a shared project directory, but not one every user
  can write, sticky bit or not: every job starts in it, and Python
  puts the working directory first on its module path (``python -m``), so a
  ``distributed.py`` dropped there would run as you on every node (refused);
  one your group can write gets the warning above;
* an existing ``log_dir``, ``db_dir`` or ``worker_dir`` must be yours and
  writable by nobody else (refused); one others can read gets a warning that
  says what they can read and the ``chmod`` that stops it.

Files are written under a fresh name (``O_CREAT | O_EXCL | O_NOFOLLOW``) and
renamed into place, so a planted symlink is replaced, never followed, and a
job script is whole and the one written when ``sbatch`` or ``bash`` reads
it, from a directory only you can write. The cluster's credentials live in
``<work_dir>/.mspass_cluster/<cluster name>/``, made fresh (0700) at start
and removed at close.

With ``security=False`` directories and files get your umask and nothing is
checked; files are still written without following links.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import shlex
import shutil
import stat
import tempfile

from .errors import ConfigError

__all__ = [
    "PRIVATE_PARENT",
    "cluster_umask",
    "directory_mode",
    "file_mode",
    "prepare_directories",
    "directory_bytes",
    "create_private_dir",
    "remove_private_dir",
    "write_file",
    "open_new",
    "touch",
]

logger = logging.getLogger("mspass_cluster")

#: The directory in ``work_dir`` that holds each cluster's private directory.
PRIVATE_PARENT = ".mspass_cluster"

#: The cluster's directories, in the order they are made, and what each holds (for messages).
DIRECTORIES = {
    "work_dir": "the jobs' working directory",
    "log_dir": "the job scripts (they run as you), the jobs' logs and the heartbeat",
    "db_dir": "the database's files (your data)",
    "worker_dir": "the Dask workers' spill files (your data)",
}

_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def cluster_umask(options) -> int | None:
    """The umask of everything the cluster creates: 077, 027 with ``group_access``, None without ``security``."""
    if not options.security:
        return None
    return 0o027 if options.group_access else 0o077


def directory_mode(options) -> int | None:
    """0700 (0750 with ``group_access``), or None: the user's umask decides."""
    umask = cluster_umask(options)
    return None if umask is None else 0o777 & ~umask


def file_mode(options) -> int | None:
    """0600 (0640 with ``group_access``), or None: the user's umask decides."""
    umask = cluster_umask(options)
    return None if umask is None else 0o666 & ~umask


# ------------------------------------------------------------------ who is who
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _described(st: os.stat_result) -> str:
    """``owned by alice, group proj, mode 2770``."""
    return f"owned by {_user(st.st_uid)}, group {_group(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def _writers(st: os.stat_result) -> str:
    """Who besides the owner has write permission (the caller knows someone has)."""
    return "every user" if st.st_mode & stat.S_IWOTH else f"the members of group {_group(st.st_gid)!r}"


def _readers(st: os.stat_result, trust_group: bool) -> str | None:
    """Who besides the owner can list or enter it (a group trusted with ``group_access`` does not count)."""
    if st.st_mode & (stat.S_IROTH | stat.S_IXOTH):
        return "every user of this machine"
    if not trust_group and st.st_mode & (stat.S_IRGRP | stat.S_IXGRP):
        return f"the members of group {_group(st.st_gid)!r}"
    return None


def _replaceable_by(st: os.stat_result) -> str | None:
    """Who besides the owner can rename or remove its entries: writable without the sticky bit."""
    if st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return "every user"
    if st.st_mode & stat.S_IWGRP:
        return "group"
    return None


# ------------------------------------------------------------------ the checks
def _chains(path: str) -> list[list[str]]:
    """The directories above ``path``, from ``/`` down: as written, and again with symlinks resolved."""
    chains = []
    for candidate in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        chain = [os.path.dirname(candidate)]
        while os.path.dirname(chain[-1]) != chain[-1]:
            chain.append(os.path.dirname(chain[-1]))
        chains.append(chain[::-1])
    return chains


def _check_owner(directory: str, st: os.stat_result, name: str, path: str) -> None:
    """Refuse another user's directory made where every user can make one (``/tmp``, ``/scratch``): a trap.

    Its owner controls everything below it. A directory of root's, of yours,
    or made where only some can make one (a project directory the site made
    for a group, in ``/project``) is trusted to its owner.
    """
    if st.st_uid in (0, os.geteuid()):
        return
    try:
        above = os.stat(os.path.dirname(directory))
    except OSError:
        return
    if above.st_mode & stat.S_IWOTH:
        mine = os.path.join(os.path.dirname(directory), _user(os.geteuid()))
        raise ConfigError(
            f"{name}={path!r}: {directory} ({_described(st)}) is another user's, made in {os.path.dirname(directory)}"
            f", where every user can make one; whoever made it controls everything below it, your job scripts "
            f"included. Use a directory of your own, e.g. {name}={os.path.join(mine, 'run')!r} or one under $HOME."
        )


def _group_warning(directory: str, st: os.stat_result) -> str:
    return (
        f"{directory} ({_described(st)}) can be written by the members of group {_group(st.st_gid)!r}: any of them "
        "could put a Python module where your jobs start or replace the cluster's directories below it, and so "
        f"run code as you. If you trust every member of {_group(st.st_gid)!r}, say so with group_access=True; "
        "otherwise choose a work_dir only you can write, e.g. under $HOME or $SCRATCH/$USER."
    )


def _check_parents(path: str, name: str, trust_group: bool, warnings: dict) -> None:
    """Refuse a parent others control (see the module's docstring); note one the group can write (``warnings``)."""
    for chain in _chains(path):
        for parent in chain:
            try:
                st = os.stat(parent)
            except OSError:
                break  # not there yet (it will be made) or not ours to see (making it will say so)
            _check_owner(parent, st, name, path)
            who = _replaceable_by(st)
            if who == "every user":
                raise ConfigError(
                    f"{name}={path!r} lies in {parent} ({_described(st)}), which every user can write and which has "
                    "no sticky bit: anyone could rename what is below it and put their own in its place, your job "
                    f"scripts included. Choose a {name} elsewhere, e.g. under $HOME or $SCRATCH/$USER, or ask the "
                    f"directory's owner to set the sticky bit (chmod +t {shlex.quote(parent)})."
                )
            if who == "group" and not trust_group:
                warnings.setdefault(parent, _group_warning(parent, st))


def _check_work_dir(path: str, trust_group: bool, warnings: dict) -> None:
    """``work_dir`` may be shared, but nobody else may put files in it (the jobs' working directory)."""
    st = os.stat(path)
    _check_owner(os.path.realpath(path), st, "work_dir", path)
    if st.st_mode & stat.S_IWOTH:
        sticky = " (the sticky bit does not help: new files are enough)" if st.st_mode & stat.S_ISVTX else ""
        mine = os.path.join(path, _user(os.geteuid()))
        example = f"work_dir={mine!r}" if st.st_mode & stat.S_ISVTX else "a directory under $HOME or $SCRATCH/$USER"
        raise ConfigError(
            f"work_dir={path!r} ({_described(st)}) can be written by every user{sticky}: every job starts in it, "
            "and Python puts the working directory first on its module path, so a file such as distributed.py "
            f"put there would run as you on every node. Use a directory of your own, e.g. {example}."
        )
    if st.st_mode & stat.S_IWGRP and not trust_group:
        warnings.setdefault(path, _group_warning(path, st))


def _check_own_directory(path: str, name: str, trust_group: bool) -> str | None:
    """An existing log, database or worker directory: yours, writable by nobody else; a warning if others can read it."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"{name}={path!r} ({_described(st)}) is not yours, so its owner controls {DIRECTORIES[name]}. "
            f"Give this cluster a directory of your own: another {name}= (or another work_dir=, if {name} is its "
            "default in work_dir)."
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{name}={path!r} ({_described(st)}) can be written by {_writers(st)}, who could replace "
            f"{DIRECTORIES[name]}. Make it yours alone: chmod go-w {shlex.quote(path)} (and chmod go-rwx to keep it "
            f"private), or choose another {name}=."
        )
    readers = _readers(st, trust_group)
    if readers is None:
        return None
    who = "go" if not trust_group else "o"
    return (
        f"{name}={path!r} ({_described(st)}) can be read by {readers}: {DIRECTORIES[name]}. To keep them to "
        f"yourself: chmod {who}-rwx {shlex.quote(path)}"
    )


def _make_directories(path: str, mode: int | None) -> None:
    """Create ``path`` and its missing parents; with ``mode``, chmod each one made (the umask may have cut it)."""
    missing = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o777 if mode is None else mode)
        except FileExistsError:
            continue  # made meanwhile by someone else: checked as an existing directory
        if mode is not None:
            os.chmod(directory, mode | (os.stat(directory).st_mode & stat.S_ISGID))


def _probe_writable(path: str) -> None:
    # A fresh name (mkstemp: O_EXCL), not a predictable one that a planted symlink could redirect.
    fd, probe = tempfile.mkstemp(prefix=".mspass-cluster-write-test-", dir=path)
    os.close(fd)
    os.unlink(probe)


def directory_bytes(path: str) -> int:
    """The bytes of the files under ``path`` (0 when it does not exist; unreadable entries are skipped)."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def prepare_directories(options) -> None:
    """Create the work, log, database and worker directories, or say why not (see the module's docstring).

    With ``security``, each one created gets mode 0700 (0750 with
    ``group_access``), and existing ones and their parents are checked.
    Warnings (directories others can read, or your group can write) are
    logged once each.

    Raises
    ------
    ConfigError
        Naming the directory, the option it came from, its owner and mode
        or the OS error, and the fix.
    """
    secure = bool(options.security)
    trust_group = bool(options.group_access)
    mode = directory_mode(options)
    warnings: dict[str, str] = {}
    for name in DIRECTORIES:
        path = getattr(options, name)
        try:
            if secure:
                _check_parents(path, name, trust_group, warnings)
            _make_directories(path, mode)
            if secure and name == "work_dir":
                _check_work_dir(path, trust_group, warnings)
            elif secure:
                warning = _check_own_directory(path, name, trust_group)
                if warning:
                    warnings.setdefault(path, warning)
            _probe_writable(path)
        except OSError as exc:
            raise ConfigError(
                f"{name}={path!r} cannot be created or written: {exc.strerror or exc}. "
                f"Choose a writable directory on a file system all nodes share, e.g. {name}='$SCRATCH/mspass'."
            ) from exc
    for text in warnings.values():
        logger.warning("%s", text)


# ------------------------------------------------------- the private directory
def create_private_dir(work_dir: str, cluster_name: str) -> str:
    """Make ``<work_dir>/.mspass_cluster/<cluster_name>/`` fresh, mode 0700, and return its path.

    The parent ``.mspass_cluster`` is made 0700 if missing; an existing one
    must be a directory of yours that nobody else can write, and nothing
    above it may be writable by every user without the sticky bit. The
    private directory itself must not exist: one that does was left by a
    cluster that did not close, or put there by someone else.

    Raises
    ------
    ConfigError
        Naming the directory, what is wrong (owner, mode, existence) and the fix.
    """
    parent = os.path.join(os.path.abspath(work_dir), PRIVATE_PARENT)
    path = os.path.join(parent, cluster_name)
    _check_parents(parent, "work_dir", trust_group=True, warnings={})
    try:
        try:
            os.mkdir(parent, 0o700)
            os.chmod(parent, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(
                f"{parent} is not a directory (a {'symlink' if stat.S_ISLNK(st.st_mode) else 'file'}), so the "
                f"cluster's credentials cannot be kept in it. Remove it (rm {shlex.quote(parent)}) if it is yours, "
                "or choose another work_dir=."
            )
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "is not yours" if st.st_uid != os.geteuid() else f"can be written by {_writers(st)}"
            raise ConfigError(
                f"{parent} ({_described(st)}) {problem}, so the cluster's credentials cannot be kept private in it. "
                + (
                    f"Make it yours alone: chmod 700 {shlex.quote(parent)}, or choose another work_dir=."
                    if st.st_uid == os.geteuid()
                    else "Choose another work_dir= (its owner can remove it)."
                )
            )
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise ConfigError(
                f"{path} already exists: a cluster named {cluster_name} did not remove its credentials, or someone "
                f"else made it. A fresh one is needed; remove it (rm -r {shlex.quote(path)}) if it is yours and no "
                "cluster of that name runs."
            ) from None
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ConfigError(
            f"The cluster's private directory {path} cannot be created: {exc.strerror or exc}. work_dir="
            f"{work_dir!r} must be a directory you can write."
        ) from exc
    return path


def remove_private_dir(path: str | None) -> None:
    """Remove a private directory and the credentials in it (a warning, not an error, if that fails)."""
    if not path:
        return
    try:
        shutil.rmtree(path)  # on Linux without following symlinks, by directory descriptors
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning(
            "Could not remove the cluster's credentials in %s: %s. Remove them by hand: rm -r %s",
            path,
            exc.strerror or exc,
            shlex.quote(path),
        )


# ---------------------------------------------------------------- writing files
def open_new(path: str, mode: int | None) -> int:
    """A file descriptor of ``path``, created new (never an existing file, never through a symlink).

    With ``mode`` the file gets exactly it; without, ``0o666`` less the umask.
    """
    fd = os.open(path, _OPEN_NEW, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)
    return fd


def write_file(path: str, data: str | bytes, mode: int | None = None) -> None:
    """Write ``path`` whole: a new file under a fresh name in the same directory, renamed over ``path``.

    Whatever was at ``path`` (an older version, a planted symlink) is
    replaced, never followed or written through; a reader sees the old file
    or the new one, complete.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = open_new(temporary, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def touch(path: str, mode: int | None = None) -> None:
    """Create ``path`` (with ``mode``) or refresh its time, without following a symlink at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 if mode is None else mode)
    try:
        if mode is not None and stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
        os.utime(fd)
    finally:
        os.close(fd)
