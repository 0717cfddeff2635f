#!/usr/bin/env python3
"""container_standin: a STAND-IN for Apptainer 1.3.4 and SingularityCE 4.1.5, used only by the tests.

No Apptainer or Singularity binary exists on the test machines. The package
runs every role as ``<runtime> exec [options] IMAGE COMMAND ARGS...``, so the
tests put ``tests/bin`` first on PATH, where ``apptainer`` and ``singularity``
are tiny shell wrappers around this program (``--as apptainer|singularity``).
It uses the Python standard library only; the wrappers take the interpreter
from ``$MSPASS_STANDIN_PYTHON``, else ``python3``.

This is NOT a container runtime: there is no image file system. The command
runs on the host's root file system, which plays the part of the image's
root. What the stand-in reproduces was checked against the runtimes' sources
(apptainer v1.3.4, sylabs/singularity v4.1.5); where it cannot, it says so.

Images
------
* A directory is a sandbox image. Its environment comes from
  ``<dir>/.singularity.d/env/*.sh``, sourced in name order exactly as the
  runtime's action script does (``10-docker*.sh`` then the default PATH
  appended, ``90-environment.sh`` with the default PATH first, ...), or from
  ``<dir>/environment`` when there is no ``.singularity.d/env``.
* A regular file whose name ends in ``.sif`` (or which has the SIF magic) is a
  SIF image. Its content is never read: a one-line text header is enough. Its
  environment - the ``ENV`` lines of the Dockerfile it was built from, which
  the runtime keeps in ``/.singularity.d/env/10-docker2singularity.sh`` - is
  read from the SIDECAR FILE ``<image>.env`` (``image.sif.env``): shell
  syntax, ``NAME=value`` or ``export NAME=value`` lines, values may be quoted,
  every assignment is exported (like Docker ENV); a missing sidecar means an
  image without ENV.
* Anything else: ``could not open image ...: image format not recognized``;
  a missing path: ``could not open image P: failed to retrieve path for P:
  lstat X: no such file or directory`` (exit 255). URIs (docker://,
  library://, oras://, ...) are refused: the stand-in cannot pull.

Faithful (what the package relies on)
-------------------------------------
* Command line: ``--version`` (``apptainer version 1.3.4-standin``,
  ``singularity-ce version 4.1.5-standin``), ``version``, ``help``; global
  options ``-d/--debug -q/--quiet -s/--silent -v/--verbose --nocolor
  -c/--config FILE --build-config``; the full list of ``exec`` options with
  cobra/pflag parsing (``--opt value``, ``--opt=value``, ``-B value``,
  ``-Bvalue``, ``-ec``, ``--``); options stop at the image, everything after
  it is the command, untouched. Usage errors are cobra's: unknown flag ->
  ``Error for command "exec": unknown flag: --xyz`` on stderr, the options
  and ``Run 'apptainer --help' for more detailed usage information.`` on
  stdout, EXIT STATUS 1 (``ExecuteApptainer`` ends with ``os.Exit(1)``; it is
  not 255); unknown command -> ``Error: unknown command "x" for "apptainer"``,
  exit 1. Runtime failures are ``FATAL:   ...`` on stderr, exit 255.
* Options also from the environment, as the runtimes read them:
  ``APPTAINER_BIND``/``APPTAINER_BINDPATH`` (and ``SINGULARITY_BIND``...,
  with apptainer's "is set, but ... is preferred" notice) are appended to
  ``--bind``; ``APPTAINER_CLEANENV``, ``_CONTAIN``, ``_HOME``, ``_NV``, ...
  set an option not given on the command line.
* Environment, following ``SetContainerEnv`` and the action script:
  host variables are inherited except HOME, PATH, LD_LIBRARY_PATH and the
  runtime's own ``APPTAINER_*``/``SINGULARITY_*``; with ``--cleanenv`` only
  TERM and the proxy variables pass, and LANG=C; HOME is the home
  destination; PATH starts as ``/usr/local/sbin:/usr/local/bin:/usr/sbin:
  /usr/bin:/sbin:/bin`` (the host PATH is never inherited, as with the real
  tools) and the image's scripts set it. The image's ENV overrides inherited
  host values; ``APPTAINERENV_NAME`` (apptainer; also ``SINGULARITYENV_NAME``
  with an INFO notice, or a WARNING when both differ) or
  ``SINGULARITYENV_NAME`` (singularity; APPTAINERENV_ is just a host variable
  there), ``--env`` and ``--env-file`` override the image (``--env`` beats
  ``--env-file`` beats the prefixed variables); ``..._PATH``,
  ``..._PREPEND_PATH``, ``..._APPEND_PATH`` change PATH; overriding HOME or
  PATH directly is refused with the runtime's warning. Injected values are
  evaluated by the shell (``"$X"`` expands) unless ``--no-eval``. Prefixed
  variables never appear with their prefix. Inside: ``APPTAINER_CONTAINER``
  and ``SINGULARITY_CONTAINER`` (image absolute path), ``..._NAME``,
  ``..._BIND`` (destinations), ``APPTAINER_COMMAND=exec``, PS1,
  ``..._ENVIRONMENT`` - singularity sets only the ``SINGULARITY_`` ones.
  ``--env`` is a pflag string-to-string map: a value with one ``=`` is kept
  whole (``--env A=x,y``), with several it is split on commas (``--env
  A=1,B=2``), like the real tools.
* Mounts are REAL, made with bubblewrap in a private mount namespace (same
  network, PID, IPC and user namespaces unless stated): the root is
  read-only like an image's (``--writable-tmpfs`` lifts that); the host /tmp,
  /var/tmp, the home directory and the current directory (unless it is /,
  /etc, /usr, ... or under /proc, /sys, /dev) are bound read-write as the
  runtime does by default; ``--bind src[:dst[:ro|rw]]`` and ``--mount
  type=bind,...`` are bind mounts (``:ro`` refuses writes); ``--contain``
  gives an empty /tmp, /var/tmp and home and a minimal /dev; ``--ipc`` a new
  IPC namespace. A missing bind source fails like the runtime:
  ``FATAL:   container creation failed: mount hook function failure: mount
  SRC->DST error: while mounting SRC: mount source SRC doesn't exist``
  (singularity: without "mount hook function failure: "), exit 255.
* The command is looked up on the container's PATH (after the image's
  environment) with the runtime's messages: ``FATAL:   "xyz": executable file
  not found in $PATH``, exit 255; argv[0] becomes the resolved path; scripts
  without ``#!`` run under /bin/sh; ``--pwd``/``--cwd`` set the working
  directory (missing: ``failed to set working directory``, exit 255), else the
  current directory, else HOME, else /; ``--home DIR`` or ``SRC:DST`` sets
  HOME and binds it.
* Processes and signals, as the runtime's "master" process: the PID the
  caller sees is this program, the root of the container's process tree; it
  stays the command's ancestor, FORWARDS every signal it receives (TERM, INT,
  HUP, USR1, ...) to the command, and exits with the command's exit status.
  When the caller is not the terminal's foreground process group (batch
  jobs), signals are forwarded; in a terminal's foreground group they are
  not (the terminal signals the whole group), as the runtime decides. If this
  process is killed (SIGKILL) the command is killed too (parent-death signal,
  as the runtime's starter sets it). The command starts with every signal at
  its default disposition and none blocked. Same network namespace: servers
  in the container listen on the host's interfaces.
* ``--nv`` without an NVIDIA driver: ``WARNING: Could not find any nv files on
  this host!`` and ``... nv libraries ...``, then the command runs.
  Messages honour ``-q`` (no INFO), ``-s`` (errors only) and
  ``APPTAINER_MESSAGELEVEL``.

Not faithful (limits of a stand-in)
-----------------------------------
* No image file system: the host root file system is the container's root
  (read-only); programs "in the image" are the host's. No SIF parsing,
  signature or encryption checks; ``image-src``/``id`` binds are refused.
* The read-only root is a non-recursive remount: other host file systems
  mounted under / stay writable. A missing bind destination is created by
  bwrap on the host file system (the runtime creates it only inside the
  container); as non-root that may fail.
* ``--writable-tmpfs`` (and ``--compat``) make the host root writable: writes
  persist on the host, there is no overlay. ``--pid`` and ``--containall``
  create no PID namespace (``--containall`` = ``--contain --cleanenv --ipc``
  here). No user namespace, fakeroot, overlay, network/UTS namespace,
  cgroups, capabilities, instances, apps, GPU library binding (``--nv`` only
  checks and warns). Options the runtime has but the stand-in does not
  emulate fail with a FATAL naming the stand-in, exit 255; commands other
  than exec/version/help likewise.
* The image's environment scripts, the injected variables and ``--env-file``
  are run by the host's bash instead of the runtime's embedded shell
  interpreter (``--env-file`` may run commands; the runtime refuses them).
  apptainer.conf is not read: its defaults are assumed (mount home/tmp/cwd,
  no system bind paths beyond what the host root shows).
* Exit status: bwrap cannot report that the command died of a signal, only
  128+N. The stand-in then re-raises N on itself (like the runtime's master)
  when it had received and forwarded N, or N is SIGKILL; otherwise it exits
  128+N.

Bubblewrap and signals (what was found with bwrap 0.8.0 on Debian 12)
---------------------------------------------------------------------
bwrap never forwards signals: SIGTERM sent to the bwrap process kills bwrap
(status 143) and leaves the command running, orphaned; with
``--die-with-parent`` the command is SIGKILLed instead (no clean shutdown);
with ``--unshare-pid`` the PID-1 reaper does not forward either. So this
program does not exec bwrap: it stays the parent (the runtime's master),
learns the command's PID from ``bwrap --info-fd`` (no PID namespace, so it is
a host PID), forwards signals to it, and takes the status bwrap returns (the
command's exit code, 128+N after signal N). bwrap runs with the forwarded
signals BLOCKED (only SIGKILL can end it), so a signal sent to the whole
process group or cgroup - as Slurm does - cannot kill bwrap and take the
command down with it; the small stage-2 program that bwrap starts
(``STAGE2_SOURCE``, run by ``python3 -I -S`` from a memfd) resets the signal
dispositions and mask, changes directory, looks the command up and execs it
in place, so the command keeps bwrap's child PID.
If bwrap is missing or cannot create a mount namespace here (or
``MSPASS_STANDIN_NO_BWRAP=1``), the command runs directly after the same
checks, with a one-line notice on stderr: binds to another destination,
``:ro``, ``--contain`` and the read-only root are then NOT emulated.
"""

import csv
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STANDIN = "container_standin"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# --------------------------------------------------------------------------
# The two runtimes


class Flavour:
    def __init__(self, **kw):
        self.__dict__.update(kw)


APPTAINER = Flavour(
    cmd="apptainer",
    package="apptainer",
    version="1.3.4-standin",
    cfg_prefixes=("APPTAINER_", "SINGULARITY_"),  # options from the environment; never forwarded
    env_prefixes=("APPTAINERENV_", "SINGULARITYENV_"),  # forwarded into the container, prefix removed
    omit_keys={
        "HOME": False,
        "PATH": False,
        "APPTAINER_SHELL": False,
        "APPTAINER_APPNAME": False,
        "SINGULARITY_SHELL": False,
        "SINGULARITY_APPNAME": False,
        "LD_LIBRARY_PATH": True,
    },
    keep_on_clear=("PWD", "HOME", "OPTIND", "UID", "GID", "SINGULARITY_APPNAME", "SINGULARITY_SHELL"),
    readonly_on_clear=("APPTAINER_NAME", "APPTAINER_CONTAINER", "APPTAINER_INSTANCE"),
    ps1="Apptainer> ",
    environment_vars=("APPTAINER_ENVIRONMENT", "SINGULARITY_ENVIRONMENT"),
    mount_hook_prefix="mount hook function failure: ",
    commands=(
        "build",
        "cache",
        "capability",
        "checkpoint",
        "completion",
        "config",
        "delete",
        "exec",
        "help",
        "inspect",
        "instance",
        "key",
        "keyserver",
        "oci",
        "overlay",
        "plugin",
        "pull",
        "push",
        "registry",
        "remote",
        "run",
        "run-help",
        "search",
        "shell",
        "sif",
        "sign",
        "test",
        "verify",
        "version",
    ),
)
SINGULARITY = Flavour(
    cmd="singularity",
    package="singularity-ce",
    version="4.1.5-standin",
    cfg_prefixes=("SINGULARITY_",),
    env_prefixes=("SINGULARITYENV_",),
    omit_keys={
        "HOME": False,
        "PATH": False,
        "SINGULARITY_SHELL": False,
        "SINGULARITY_APPNAME": False,
        "LD_LIBRARY_PATH": True,
    },
    keep_on_clear=("PWD", "HOME", "OPTIND", "UID", "SINGULARITY_APPNAME", "SINGULARITY_SHELL"),
    readonly_on_clear=("SINGULARITY_NAME", "SINGULARITY_CONTAINER", "SINGULARITY_INSTANCE"),
    ps1="Singularity> ",
    environment_vars=("SINGULARITY_ENVIRONMENT",),
    mount_hook_prefix="",
    commands=(
        "build",
        "cache",
        "capability",
        "config",
        "data",
        "delete",
        "exec",
        "help",
        "inspect",
        "instance",
        "key",
        "keyserver",
        "oci",
        "overlay",
        "plugin",
        "pull",
        "push",
        "registry",
        "remote",
        "run",
        "run-help",
        "search",
        "shell",
        "sif",
        "sign",
        "test",
        "verify",
        "version",
    ),
)
FLAVOURS = {"apptainer": APPTAINER, "singularity": SINGULARITY}
ALWAYS_PASS = (
    "TERM",
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "ftp_proxy",
    "FTP_PROXY",
)

# --------------------------------------------------------------------------
# Messages (sylog): "LEVEL:" padded to 8 characters, a space, the message.

LEVELS = {"FATAL": -4, "ERROR": -3, "WARNING": -2, "LOG": -1, "INFO": 1, "VERBOSE": 2, "DEBUG": 5}


class Log:
    def __init__(self, level=1):
        self.level = level

    def write(self, name, text):
        if LEVELS[name] > self.level:
            return
        if self.level >= LEVELS["DEBUG"]:
            prefix = "%-8s%-19s%-30s" % (name, "[U=%d,P=%d]" % (os.getuid(), os.getpid()), "standin()")
        else:
            prefix = "%-8s " % (name + ":")
        sys.stderr.write(prefix + text + "\n")
        sys.stderr.flush()

    def fatal(self, text):
        self.write("FATAL", text)
        sys.exit(255)

    def error(self, text):
        self.write("ERROR", text)

    def warning(self, text):
        self.write("WARNING", text)

    def info(self, text):
        self.write("INFO", text)

    def verbose(self, text):
        self.write("VERBOSE", text)

    def debug(self, text):
        self.write("DEBUG", text)


def go_err(exc):
    """An OSError as Go prints a syscall.Errno: lower-case strerror."""
    text = os.strerror(exc.errno) if getattr(exc, "errno", None) else str(exc)
    return text[:1].lower() + text[1:]


def go_quote(text):
    """Go's %q for ordinary strings."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


# --------------------------------------------------------------------------
# Command line: a pflag-like parser over the real option tables.

BOOL, STR, INT, SARRAY, SSLICE, MAP = "bool", "string", "int", "stringArray", "strings", "stringToString"
YES, NOOP, NO = "emulated", "accepted, no effect", "not emulated"

# name, shorthand, kind, support, environment keys (after the prefix)
_EXEC_FLAGS = [
    ("app", "", STR, NO, "APP APPNAME"),
    ("bind", "B", SARRAY, YES, "BIND BINDPATH"),
    ("mount", "", SARRAY, YES, "MOUNT"),
    ("home", "H", STR, YES, "HOME"),
    ("overlay", "o", SSLICE, NO, "OVERLAY OVERLAYIMAGE"),
    ("scratch", "S", SSLICE, NO, "SCRATCH SCRATCHDIR"),
    ("workdir", "W", STR, NO, "WORKDIR"),
    ("disable-cache", "", BOOL, NOOP, "DISABLE_CACHE"),
    ("shell", "s", STR, NOOP, "SHELL"),
    ("cwd", "", STR, YES, "CWD TARGET_CWD"),
    ("pwd", "", STR, YES, "PWD TARGET_PWD"),
    ("hostname", "", STR, NO, "HOSTNAME"),
    ("network", "", STR, NO, "NETWORK"),
    ("network-args", "", SSLICE, NO, "NETWORK_ARGS"),
    ("dns", "", STR, NO, "DNS"),
    ("security", "", SSLICE, NO, "SECURITY"),
    ("apply-cgroups", "", STR, NO, "APPLY_CGROUPS"),
    ("containlibs", "", SSLICE, NO, "CONTAINLIBS"),
    ("fusemount", "", SSLICE, NO, "FUSESPEC"),
    ("tmpdir", "", STR, NOOP, "TMPDIR"),
    ("boot", "", BOOL, NO, "BOOT"),
    ("fakeroot", "f", BOOL, NO, "FAKEROOT"),
    ("cleanenv", "e", BOOL, YES, "CLEANENV"),
    ("compat", "", BOOL, YES, "COMPAT"),
    ("contain", "c", BOOL, YES, "CONTAIN"),
    ("containall", "C", BOOL, YES, "CONTAINALL"),
    ("nv", "", BOOL, YES, "NV"),
    ("nvccli", "", BOOL, NO, "NVCCLI"),
    ("rocm", "", BOOL, NO, "ROCM"),
    ("writable", "w", BOOL, NO, "WRITABLE"),
    ("writable-tmpfs", "", BOOL, YES, "WRITABLE_TMPFS"),
    ("no-home", "", BOOL, YES, "NO_HOME"),
    ("no-mount", "", SSLICE, YES, "NO_MOUNT"),
    ("no-init", "", BOOL, NOOP, "NOSHIMINIT"),
    ("no-nv", "", BOOL, YES, "NV_OFF NO_NV"),
    ("no-rocm", "", BOOL, NOOP, "ROCM_OFF NO_ROCM"),
    ("pid", "p", BOOL, NOOP, "PID UNSHARE_PID"),
    ("no-pid", "", BOOL, NOOP, "NO_PID"),
    ("ipc", "i", BOOL, YES, "IPC UNSHARE_IPC"),
    ("net", "n", BOOL, NO, "NET UNSHARE_NET"),
    ("uts", "", BOOL, NO, "UTS UNSHARE_UTS"),
    ("userns", "u", BOOL, NO, "USERNS UNSHARE_USERNS"),
    ("keep-privs", "", BOOL, NO, "KEEP_PRIVS"),
    ("no-privs", "", BOOL, NO, "NO_PRIVS"),
    ("add-caps", "", STR, NO, "ADD_CAPS"),
    ("drop-caps", "", STR, NO, "DROP_CAPS"),
    ("allow-setuid", "", BOOL, NO, "ALLOW_SETUID"),
    ("env", "", MAP, YES, ""),
    ("env-file", "", STR, YES, "ENV_FILE"),
    ("no-umask", "", BOOL, YES, "NO_UMASK"),
    ("no-eval", "", BOOL, YES, "NO_EVAL"),
    ("blkio-weight", "", INT, NO, "BLKIO_WEIGHT"),
    ("blkio-weight-device", "", SSLICE, NO, "BLKIO_WEIGHT_DEVICE"),
    ("cpu-shares", "", INT, NO, "CPU_SHARES"),
    ("cpus", "", STR, NO, "CPU_SHARES"),
    ("cpuset-cpus", "", STR, NO, "CPUSET_CPUS"),
    ("cpuset-mems", "", STR, NO, "CPUSET_MEMS"),
    ("memory", "", STR, NO, "MEMORY"),
    ("memory-reservation", "", STR, NO, "MEMORY_RESERVATION"),
    ("memory-swap", "", STR, NO, "MEMORY_SWAP"),
    ("oom-kill-disable", "", BOOL, NO, "OOM_KILL_DISABLE"),
    ("pids-limit", "", INT, NO, "PIDS_LIMIT"),
    ("authfile", "", STR, NO, ""),
    ("docker-login", "", BOOL, NO, ""),
    ("docker-host", "", STR, NO, ""),
    ("no-https", "", BOOL, NO, ""),
    ("passphrase", "", BOOL, NO, ""),
    ("pem-path", "", STR, NO, ""),
    ("help", "h", BOOL, YES, ""),
]
_APPTAINER_ONLY = [
    ("dmtcp-launch", "", STR, NO, "DMTCP_LAUNCH"),
    ("dmtcp-restart", "", STR, NO, "DMTCP_RESTART"),
    ("unsquash", "", BOOL, NOOP, "UNSQUASH"),
    ("ignore-subuid", "", BOOL, NOOP, "IGNORE_SUBUID"),
    ("ignore-fakeroot-command", "", BOOL, NOOP, "IGNORE_FAKEROOT_COMMAND"),
    ("ignore-userns", "", BOOL, NOOP, "IGNORE_USERNS"),
    ("underlay", "", BOOL, NOOP, "UNDERLAY"),
    ("sharens", "", BOOL, NO, "SHARENS"),
    ("runscript-timeout", "", STR, NOOP, "RUNSCRIPT_TIMEOUT"),
]
_SINGULARITY_ONLY = [
    ("no-setgroups", "", BOOL, NOOP, "NO_SETGROUPS"),
    ("no-compat", "", BOOL, NOOP, "NO_COMPAT"),
    ("sif-fuse", "", BOOL, NOOP, "SIF_FUSE"),
    ("proot", "", STR, NO, "PROOT"),
    ("device", "", SSLICE, NO, ""),
    ("cdi-dirs", "", SSLICE, NO, ""),
    ("oci", "", BOOL, NO, ""),
]
_GLOBAL_FLAGS = [
    ("debug", "d", BOOL, YES, "DEBUG"),
    ("nocolor", "", BOOL, NOOP, "NOCOLOR"),
    ("silent", "s", BOOL, YES, "SILENT"),
    ("quiet", "q", BOOL, YES, "QUIET"),
    ("verbose", "v", BOOL, YES, "VERBOSE"),
    ("config", "c", STR, NOOP, ""),
    ("build-config", "", BOOL, NOOP, ""),
    ("version", "", BOOL, YES, ""),
    ("help", "h", BOOL, YES, ""),
]


class Flag:
    def __init__(self, name, short, kind, support, envkeys):
        self.name, self.short, self.kind, self.support = name, short, kind, support
        self.envkeys = envkeys.split()
        self.changed = False
        self.value = {BOOL: False, STR: "", INT: 0, SARRAY: [], SSLICE: [], MAP: {}}[kind]

    def label(self):
        return "-%s, --%s" % (self.short, self.name) if self.short else "--" + self.name

    def set(self, text):
        """pflag's Value.Set; raises ValueError with pflag's wording."""
        if self.kind == BOOL:
            truth = {
                "1": True,
                "t": True,
                "T": True,
                "TRUE": True,
                "true": True,
                "True": True,
                "0": False,
                "f": False,
                "F": False,
                "FALSE": False,
                "false": False,
                "False": False,
            }
            if text not in truth:
                raise ValueError("strconv.ParseBool: parsing %s: invalid syntax" % go_quote(text))
            self.value = truth[text]
        elif self.kind == STR:
            self.value = text
        elif self.kind == INT:
            try:
                self.value = int(text, 0)
            except ValueError:
                raise ValueError("strconv.ParseInt: parsing %s: invalid syntax" % go_quote(text))
        elif self.kind == SARRAY:
            self.value = (self.value if self.changed else []) + [text]
        elif self.kind == SSLICE:
            items = next(csv.reader([text])) if text else []
            self.value = (self.value if self.changed else []) + items
        elif self.kind == MAP:
            if text.count("=") == 0:
                raise ValueError("%s must be formatted as key=value" % text)
            pairs = [text.strip('"')] if text.count("=") == 1 else next(csv.reader([text]))
            out = {}
            for pair in pairs:
                if "=" not in pair:
                    raise ValueError("%s must be formatted as key=value" % pair)
                key, value = pair.split("=", 1)
                out[key] = value
            self.value = dict(self.value, **out) if self.changed else out
        self.changed = True


class FlagError(Exception):
    pass


class FlagSet:
    def __init__(self, table):
        self.flags = [Flag(*row) for row in table]
        self.by_name = {f.name: f for f in self.flags}
        self.by_short = {f.short: f for f in self.flags if f.short}

    def __getitem__(self, name):
        return self.by_name[name]

    def _set(self, flag, text):
        try:
            flag.set(text)
        except ValueError as exc:
            raise FlagError("invalid argument %s for %s flag: %s" % (go_quote(text), go_quote(flag.label()), exc))

    def parse(self, args):
        """Parse options until the first argument that is not one (SetInterspersed(false))."""
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                return args[i + 1 :]
            if arg.startswith("--"):
                name, eq, text = arg[2:].partition("=")
                flag = self.by_name.get(name)
                if flag is None:
                    raise FlagError("unknown flag: --" + name)
                if flag.kind == BOOL:
                    self._set(flag, text if eq else "true")
                elif eq:
                    self._set(flag, text)
                elif i + 1 < len(args):
                    i += 1
                    self._set(flag, args[i])
                else:
                    raise FlagError("flag needs an argument: --" + name)
            elif arg.startswith("-") and len(arg) > 1:
                shorts = arg[1:]
                while shorts:
                    char = shorts[0]
                    flag = self.by_short.get(char)
                    if flag is None:
                        raise FlagError("unknown shorthand flag: %s in -%s" % ("'%s'" % char, shorts))
                    if len(shorts) > 2 and shorts[1] == "=":
                        self._set(flag, shorts[2:])
                        shorts = ""
                    elif flag.kind == BOOL:
                        self._set(flag, "true")
                        shorts = shorts[1:]
                    elif len(shorts) > 1:
                        self._set(flag, shorts[1:])
                        shorts = ""
                    elif i + 1 < len(args):
                        i += 1
                        self._set(flag, args[i])
                        shorts = ""
                    else:
                        raise FlagError("flag needs an argument: %s in -%s" % ("'%s'" % char, shorts))
            else:
                return args[i:]
            i += 1
        return []

    def from_environment(self, flavour, log):
        """cmdline.UpdateCmdFlagFromEnv: APPTAINER_<KEY> (then SINGULARITY_<KEY>)."""
        found = {}
        errors = []
        for rank, prefix in enumerate(flavour.cfg_prefixes):
            for flag in self.flags:
                for key in flag.envkeys:
                    if prefix + key not in os.environ:
                        continue
                    value = os.environ[prefix + key]
                    if rank > 0:
                        if key in found:
                            if found[key] != value:
                                log.warning(
                                    "%s and %s have different values, using the latter"
                                    % (prefix + key, flavour.cfg_prefixes[0] + key)
                                )
                            continue
                        log.info(
                            "Environment variable %s is set, but %s is preferred"
                            % (prefix + key, flavour.cfg_prefixes[0] + key)
                        )
                    found[key] = value
                    stripped = value.strip()
                    if not stripped:
                        continue
                    if flag.name in ("bind", "mount"):  # EnvAppendValue: added to the command line's
                        pass
                    elif flag.changed:  # EnvSetValue: only when not given on the command line
                        continue
                    elif flag.kind == SSLICE:
                        value = ",".join(v.strip() for v in stripped.split(","))
                    try:
                        flag.set(value)
                    except ValueError as exc:
                        errors.append("unable to set flag %s to value %s: %s" % (flag.name, value, exc))
                        break
        if errors:
            log.fatal("While parsing environment variables: %s" % "".join("\n" + e for e in errors))

    def usage(self):
        lines = []
        for f in self.flags:
            if f.name == "help":
                continue
            short = "-%s, " % f.short if f.short else "    "
            kind = "" if f.kind == BOOL else " " + f.kind
            lines.append("  %s--%s%s" % (short, f.name, kind))
        return "\n".join(lines) + "\n"


def exec_flagset(flavour):
    extra = _APPTAINER_ONLY if flavour is APPTAINER else _SINGULARITY_ONLY
    rows = list(_EXEC_FLAGS) + extra
    if flavour is SINGULARITY:  # its --bind is a pflag StringSlice: values are split on commas as CSV
        rows = [(n, s, SSLICE if n == "bind" else k, sup, env) for (n, s, k, sup, env) in rows]
    return FlagSet(rows)


def cobra_error(flavour, command, message, options=None, usage=None):
    """ExecuteApptainer's error path: "Error..." on stderr, the rest on stdout, exit 1."""
    sys.stderr.write(message)
    sys.stderr.flush()
    if options is not None:
        sys.stdout.write("Options for %s command:\n\n%s\n" % (command, options))
    if usage is not None:
        sys.stdout.write(usage + "\n")
    sys.stdout.write("Run '%s --help' for more detailed usage information.\n" % flavour.cmd)
    sys.stdout.flush()
    sys.exit(1)


def root_usage(flavour):
    return (
        "Usage:\n  %s [global options...] <command>\n\nAvailable Commands:\n%s\n"
        "(stand-in: only exec, version and help are emulated)\n"
        % (flavour.cmd, "".join("  %s\n" % c for c in flavour.commands))
    )


def exec_usage(flavour, flags):
    return "Usage:\n  %s [global options...] exec [exec options...] <container> <command>\n\nOptions:\n%s" % (
        flavour.cmd,
        flags.usage(),
    )


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------
# Binds: ParseBindPath / newBindPath / ParseMountString of the runtime.


class BindError(Exception):
    pass


_BIND_TOKEN = re.compile(r"([^,^:]+:?)")
_BIND_OPTIONS = {"ro": True, "rw": True, "image-src": False, "id": False}


def _split_by(text, sep):
    out, cursor = [], 0
    matches = list(re.finditer(r"[^\\]" + re.escape(sep), text))
    for n, m in enumerate(matches):
        out.append(text[cursor : m.end() - 1])
        cursor = m.end()
        if n == len(matches) - 1:
            return out + [text[cursor:]]
    return out + [text]


def _new_bind(spec):
    parts = _split_by(spec, ":")
    if len(parts) > 3:
        raise BindError("bad bind syntax %s: should be %s:%s:%s" % (go_quote(spec), parts[0], parts[1], parts[2]))
    source = parts[0].replace("\\:", ":")
    if source == "":
        raise BindError("empty bind source for bind path %s" % go_quote(spec))
    bind = {"src": source, "dst": parts[1] if len(parts) > 1 else source, "options": {}}
    if len(parts) > 2:
        for value in parts[2].split(","):
            for name, is_flag in _BIND_OPTIONS.items():
                if (is_flag and value == name) or (not is_flag and value.startswith(name + "=")):
                    bind["options"][name] = value[len(name) + 1 :] if not is_flag else ""
                    break
            else:
                raise BindError("%s is not a valid bind option" % value)
    return bind


def parse_bind_paths(paths):
    binds = []
    for path in paths:
        concat_comma = concat_colon = False
        bind, elem = "", 0
        for match in _BIND_TOKEN.findall(path):
            s = match.strip()
            is_option = any((s == o) if flag else s.startswith(o + "=") for o, flag in _BIND_OPTIONS.items())
            if elem == 2 and not is_option:
                if bind and bind[-1] == ":":
                    bind += s
                binds.append(_new_bind(bind))
                elem, bind = 0, ""
            if elem == 0:
                if (s and s[-1] == "\\") or concat_comma:
                    if not concat_comma:
                        bind += s[:-1] + ","
                    else:
                        bind += s
                        elem += 1
                    concat_comma = not concat_comma
                    continue
                elif (len(s) >= 2 and s[-2] == "\\" and s[-1] == ":") or concat_colon:
                    bind += s
                    if concat_colon:
                        elem += 1
                    concat_colon = not concat_colon
                    continue
                elif bind == "":
                    bind = s
            is_colon = bind != "" and bind[-1] == ":"
            if elem == 2 and is_option:
                if not is_colon:
                    bind += ","
                bind += s
                continue
            elif elem > 2:
                raise BindError("wrong bind syntax: %s" % bind)
            if bind != "":
                if is_colon:
                    if elem > 0:
                        bind += s
                    elem += 1
                    continue
                binds.append(_new_bind(bind))
                elem, bind = 0, ""
                continue
            bind = s
            elem += 1
        if bind != "":
            binds.append(_new_bind(bind))
    return binds


def parse_mount(text):
    binds = []
    for record in csv.reader(io.StringIO(text)):
        bind = {"src": "", "dst": "", "options": {}}
        for field in record:
            key, _, value = field.partition("=")
            if key == "type":
                if value != "bind":
                    raise BindError("unsupported mount type %s, only 'bind' is supported" % go_quote(value))
            elif key in ("source", "src"):
                if not value:
                    raise BindError("mount source cannot be empty")
                bind["src"] = value
            elif key in ("destination", "dst", "target"):
                if not value:
                    raise BindError("mount destination cannot be empty")
                bind["dst"] = value
            elif key in ("ro", "readonly"):
                bind["options"]["ro"] = ""
            elif key in ("image-src", "id"):
                bind["options"][key] = value
            elif key == "bind-propagation":
                raise BindError(
                    "bind-propagation not supported for individual mounts, check apptainer.conf for global setting"
                )
            else:
                raise BindError("invalid key %s in mount specification" % go_quote(key))
        if not bind["src"] or not bind["dst"]:
            raise BindError("mounts must specify a source and a destination")
        binds.append(bind)
    return binds


# --------------------------------------------------------------------------
# Image


def open_image(image, log):
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", image):
        log.fatal(
            "%s: %s is a URI; the stand-in cannot pull images, give a local .sif file or sandbox directory"
            % (STANDIN, image)
        )
    abspath = os.path.abspath(image)
    prefix = ""
    for part in abspath.split("/")[1:]:
        prefix += "/" + part
        try:
            os.lstat(prefix)
        except OSError as exc:
            log.fatal(
                "could not open image %s: failed to retrieve path for %s: lstat %s: %s"
                % (abspath, abspath, prefix, go_err(exc))
            )
    resolved = os.path.realpath(abspath)
    if not os.access(resolved, os.R_OK):
        log.fatal(
            "could not open image %s: %s is not readable by the current user, check permissions" % (abspath, resolved)
        )
    if os.path.isdir(resolved):
        return abspath, "sandbox", resolved
    if os.path.isfile(resolved):
        with open(resolved, "rb") as handle:
            header = handle.read(64)
        if resolved.endswith(".sif") or abspath.endswith(".sif") or header[32:41] == b"SIF_MAGIC":
            return abspath, "sif", abspath + ".env"
    log.fatal("could not open image %s: image format not recognized" % abspath)


# --------------------------------------------------------------------------
# Environment: SetContainerEnv, then the action script (run by bash).

_ACTION_SCRIPT = r"""
__standin_kind=$1 __standin_path=$2 __standin_inject=/dev/fd/$3 __standin_envfd=$4 __standin_out=$5
__standin_level=$6 __standin_ps1=$7 __standin_envvars=$8 __standin_readonly=$9
# bash gives these shell variables defaults that the runtime's interpreter does not have: without
# this, restore_env would think TERM, HOSTNAME, SHELL or PATH were set by the image.
unset HOSTNAME HOSTTYPE MACHTYPE OSTYPE SHELL TERM PATH PS4 OPTERR SHLVL
declare -a __standin_exported_env__=()
while IFS= read -r -d '' -u "$__standin_envfd" __standin_e; do __standin_exported_env__+=("$__standin_e"); done
unset __standin_e
for __standin_k in $__standin_readonly; do if test -v "$__standin_k"; then readonly "$__standin_k"; fi; done
if test -n "${SINGULARITY_APPNAME:-}"; then readonly SINGULARITY_APPNAME; fi
export PWD

sylog() {
    local lvl p
    case "$1" in
    error) lvl=-3 p="ERROR:  " ;; warning) lvl=-2 p="WARNING:" ;; info) lvl=1 p="INFO:   " ;;
    verbose) lvl=2 p="VERBOSE:" ;; debug) lvl=5 p="DEBUG:  " ;; *) return 0 ;;
    esac
    if test "$lvl" -le "$__standin_level"; then printf '%s %s\n' "$p" "$2" >&2; fi
    return 0
}
fixpath() {
    local cur="${PATH-}" out="${PATH-}" d
    for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
        case ":$cur:" in *":$d:"*) ;; *) if test -n "$out"; then out="$out:$d"; else out="$d"; fi ;; esac
    done
    printf '%s\n' "$out"
}

if test "$__standin_kind" = sandbox; then
    if test -d "$__standin_path/.singularity.d/env"; then
        __standin_injected=
        for __script__ in "$__standin_path"/.singularity.d/env/*.sh; do
            if test -f "${__script__}"; then
                sylog debug "Sourcing ${__script__}"
                case "${__script__##*/}" in
                90-environment.sh)
                    if ! test -v PATH; then export PATH="$(fixpath)"; fi
                    source "${__script__}" ;;
                10-docker2singularity.sh|10-docker.sh)
                    source "${__script__}"
                    export PATH="$(fixpath)" ;;
                99-base.sh)
                    source "${__script__}"
                    source "$__standin_inject"; __standin_injected=1 ;;
                99-runtimevars.sh) ;;
                *) source "${__script__}" ;;
                esac
            fi
        done
        # Every image the runtime builds has 99-base.sh, after which it injects.
        if test -z "$__standin_injected"; then source "$__standin_inject"; fi
    else
        if test -f "$__standin_path/environment"; then
            source "$__standin_path/environment"
            export PATH="$(fixpath)"
        fi
        source "$__standin_inject"
    fi
else
    # The SIF sidecar <image>.env plays /.singularity.d/env/10-docker2singularity.sh (Docker ENV).
    if test -f "$__standin_path"; then
        set -a; source "$__standin_path"; set +a
        export PATH="$(fixpath)"
    fi
    source "$__standin_inject"
fi

# 99-runtimevars.sh
if test -n "${SING_USER_DEFINED_PREPEND_PATH:-}"; then
    PATH="${SING_USER_DEFINED_PREPEND_PATH}:${PATH}"; unset SING_USER_DEFINED_PREPEND_PATH
fi
if test -n "${SING_USER_DEFINED_APPEND_PATH:-}"; then
    PATH="${PATH}:${SING_USER_DEFINED_APPEND_PATH}"; unset SING_USER_DEFINED_APPEND_PATH
fi
if test -n "${SING_USER_DEFINED_PATH:-}"; then
    PATH="${SING_USER_DEFINED_PATH}"; unset SING_USER_DEFINED_PATH
fi
export PATH

# restore_env: host values the image did not define come back; empty ones go.
for e in "${__standin_exported_env__[@]}"; do
    key=${e%%=*}
    if ! test -v "${key}"; then
        export "${e}"
    elif test -z "${!key}"; then
        unset "${key}"
    fi
done

if test -z "${PS1:-}"; then export PS1="$__standin_ps1"; fi
if test -z "${PROMPT_COMMAND:-}"; then
    export PROMPT_COMMAND="PS1=\"${PS1}\"; unset PROMPT_COMMAND"
else
    export PROMPT_COMMAND="${PROMPT_COMMAND:-}; PROMPT_COMMAND=\"\${PROMPT_COMMAND%%; PROMPT_COMMAND=*}\"; PS1=\"${PS1}\""
fi
set -- $__standin_envvars
__standin_first=$1
export "$1=${!1:-/.singularity.d/env/91-environment.sh}"
shift
for __standin_k in "$@"; do export "$__standin_k=${!__standin_first}"; done

for __standin_k in $(compgen -e); do printf '%s=%s\0' "$__standin_k" "${!__standin_k}"; done >&"$__standin_out"
printf '__STANDIN_DONE__=1\0' >&"$__standin_out"
"""

_ENV_FILE_SCRIPT = r"""
unset SHLVL
while IFS= read -r -d '' -u "$2" __standin_e; do
    __standin_k=${__standin_e%%=*}
    if [[ $__standin_k =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then printf -v "$__standin_k" '%s' "${__standin_e#*=}" 2>/dev/null; fi
done
unset __standin_e __standin_k
set -a
source "$1" || exit $?
set +a
for __standin_k in $(compgen -e); do printf '%s=%s\0' "$__standin_k" "${!__standin_k}"; done >&"$3"
printf '__STANDIN_DONE__=1\0' >&"$3"
"""


def _memfd(name, data=b""):
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _nul_env(entries):
    return b"".join(("%s=%s" % kv).encode("utf-8", "surrogateescape") + b"\0" for kv in entries)


def _parse_nul_env(data):
    out, done = {}, False
    for item in data.split(b"\0"):
        if not item or b"=" not in item:
            continue
        key, value = item.decode("utf-8", "surrogateescape").split("=", 1)
        if key == "__STANDIN_DONE__":
            done = True
        elif key != "_":
            out[key] = value
    return out, done


def bash_path(log):
    path = shutil.which("bash") or ("/bin/bash" if os.access("/bin/bash", os.X_OK) else None)
    if path is None:
        log.fatal("%s: bash is needed to run the image's environment scripts" % STANDIN)
    return path


def evaluate_env_file(path, image, log):
    """--env-file: the file is evaluated with allexport; the variables it sets are returned."""
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as exc:
        log.fatal("could not read %s environment file: open %s: %s" % (go_quote(path), path, go_err(exc)))
    current = dict(os.environ, APPTAINER_IMAGE=image)
    script = _memfd("standin-env-file-content", content)
    env_in = _memfd("standin-host-env", _nul_env(current.items()))
    out = _memfd("standin-env-file")
    proc = subprocess.run(
        [
            bash_path(log),
            "--noprofile",
            "--norc",
            "-c",
            _ENV_FILE_SCRIPT,
            "bash",
            "/dev/fd/%d" % script,
            str(env_in),
            str(out),
        ],
        env={},
        pass_fds=(script, env_in, out),
        stdin=subprocess.DEVNULL,
    )
    values, done = _parse_nul_env(_read_fd(out))
    for fd in (script, env_in, out):
        os.close(fd)
    if not done:
        log.fatal("while processing %s: while evaluating environment script: exit status %d" % (path, proc.returncode))
    read_only = {"EUID", "GID", "HOME", "IFS", "OPTIND", "PWD", "UID"}
    return {k: v for k, v in values.items() if k not in read_only}


def container_environment(flavour, host_env, cleanenv, home_dest, log):
    """SetContainerEnv: the process environment and the prefixed overrides."""
    process, overrides = {}, {}
    if cleanenv:
        process["LANG"] = "C"

    def add_host(key):
        if key in ALWAYS_PASS:
            return True
        return not (key in flavour.omit_keys or cleanenv)

    if flavour is APPTAINER:
        legacy, new = flavour.env_prefixes[1], flavour.env_prefixes[0]
        for key, value in host_env.items():
            if key.startswith(legacy) and key[len(legacy) :]:
                name = key[len(legacy) :]
                if new + name in host_env:
                    if host_env[new + name] != value:
                        log.warning("%s and %s have different values, using the latter" % (key, new + name))
                else:
                    log.info("Environment variable %s is set, but %s is preferred" % (key, new + name))
        for prefix in flavour.env_prefixes:
            for key, value in host_env.items():
                if not key.startswith(prefix) or not key[len(prefix) :]:
                    continue
                name = key[len(prefix) :]
                if name in ("PREPEND_PATH", "APPEND_PATH", "PATH"):
                    name = "SING_USER_DEFINED_" + name
                elif flavour.omit_keys.get(name) is False:
                    log.warning("Overriding %s environment variable with %s is not permitted" % (name, key))
                    continue
                if name in overrides:
                    if overrides[name] != value:
                        log.warning(
                            "Skipping environment variable [%s=%s], %s is already overridden with "
                            "different value [%s]" % (key, value, name, overrides[name])
                        )
                    continue
                overrides[name] = value
                process.pop(name, None)
        for key, value in host_env.items():
            if key.startswith(flavour.cfg_prefixes) or key.startswith(flavour.env_prefixes):
                continue
            if add_host(key):
                if key in overrides:
                    if overrides[key] != value:
                        log.warning(
                            "Environment variable %s already has value [%s], will not forward new "
                            "value [%s] from parent process environment" % (key, overrides[key], value)
                        )
                else:
                    process[key] = value
    else:
        prefix = flavour.env_prefixes[0]
        for key, value in host_env.items():
            if key.startswith(flavour.cfg_prefixes):
                continue
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name in ("PREPEND_PATH", "APPEND_PATH", "PATH"):
                    overrides["SING_USER_DEFINED_" + name] = value
                    continue
                if not name:
                    continue
                if flavour.omit_keys.get(name) is False:
                    log.warning("Overriding %s environment variable with %s is not permitted" % (name, key))
                    continue
                overrides[name] = value
                process.pop(name, None)
            elif key not in overrides and add_host(key):
                process[key] = value
    process["HOME"] = home_dest
    process["PATH"] = DEFAULT_PATH
    return process, overrides


def inject_script(overrides, no_eval):
    """The virtual /.inject-apptainer-env.sh."""
    text = 'if ! test -v PATH; then\n    export PATH="%s"\nfi\n' % DEFAULT_PATH
    for key, value in overrides.items():
        if key in ("UID", "GID"):
            continue
        if key == "LD_LIBRARY_PATH" and value:
            value += ":/.singularity.d/libs"
        if no_eval:
            quoted = "'" + value.replace("'", "'\"'\"'") + "'"
        else:
            quoted = '"' + value.replace('"', '\\"') + '"'
        text += 'if test -v %s; then\n    sylog debug "Overriding %s environment variable"\nfi\nexport %s=%s\n' % (
            key,
            key,
            key,
            quoted,
        )
    return text.encode("utf-8", "surrogateescape")


def run_action_script(flavour, kind, path, process, overrides, no_eval, cwd, log):
    exported = [(k, v) for k, v in process.items() if _NAME_RE.match(k)]
    keep = set(flavour.keep_on_clear) | set(flavour.readonly_on_clear)
    start_env = {k: v for k, v in exported if k in keep}  # clear_env
    env_in = _memfd("standin-exported-env", _nul_env(exported))
    inject = _memfd("standin-inject", inject_script(overrides, no_eval))
    out = _memfd("standin-final-env")
    argv = [
        bash_path(log),
        "--noprofile",
        "--norc",
        "-c",
        _ACTION_SCRIPT,
        "bash",
        kind,
        path,
        str(inject),
        str(env_in),
        str(out),
        str(log.level),
        flavour.ps1,
        " ".join(flavour.environment_vars),
        " ".join(flavour.readonly_on_clear),
    ]
    proc = subprocess.run(
        argv,
        env=start_env,
        pass_fds=(env_in, inject, out),
        stdin=subprocess.DEVNULL,
        cwd=cwd if os.path.isdir(cwd) else "/",
    )
    final, done = _parse_nul_env(_read_fd(out))
    for fd in (env_in, inject, out):
        os.close(fd)
    if not done:  # an environment script called exit
        sys.exit(proc.returncode)
    return final


# --------------------------------------------------------------------------
# GPU


def nv_check(log):
    binaries = (
        "nvidia-smi",
        "nvidia-debugdump",
        "nvidia-persistenced",
        "nvidia-cuda-mps-control",
        "nvidia-cuda-mps-server",
    )
    files = [b for b in binaries if shutil.which(b)]
    if os.path.exists("/var/run/nvidia-persistenced/socket"):
        files.append("/var/run/nvidia-persistenced/socket")
    libs = []
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig:
        try:
            listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
            libs = [line for line in listing.splitlines() if "libcuda.so" in line or "libnvidia-ml.so" in line]
        except (OSError, subprocess.SubprocessError):
            pass
    if not files:
        log.warning("Could not find any nv files on this host!")
    if not libs:
        log.warning("Could not find any nv libraries on this host!")


# --------------------------------------------------------------------------
# Launching: the master process (this one) and stage 2 (in the namespace).


def forwarded_signals():
    skip = {
        signal.SIGKILL,
        signal.SIGSTOP,
        signal.SIGCHLD,
        signal.SIGURG,
        signal.SIGSEGV,
        signal.SIGBUS,
        signal.SIGILL,
        signal.SIGFPE,
        signal.SIGTRAP,
        signal.SIGSYS,
    }
    return sorted(int(s) for s in signal.valid_signals() if int(s) not in {int(x) for x in skip})


def propagate_signals():
    """The runtime forwards signals unless it is in the terminal's foreground process group."""
    pgrp = 0
    for fd in (0, 1, 2):
        try:
            pgrp = os.tcgetpgrp(fd)
        except OSError:
            continue
        if pgrp:
            break
    return pgrp <= 0 or pgrp != os.getpgrp()


def bwrap_usable(log):
    if os.environ.get("MSPASS_STANDIN_NO_BWRAP") == "1":
        return None, "MSPASS_STANDIN_NO_BWRAP=1"
    path = shutil.which("bwrap")
    if path is None:
        return None, "bwrap is not installed"
    true = shutil.which("true") or "/bin/true"
    probe = subprocess.run(
        [path, "--bind", "/", "/", "--", true],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if probe.returncode != 0:
        return None, "bwrap cannot create a mount namespace here: %s" % probe.stderr.strip()
    return path, None


def _reraise(sig, fallback_status):
    try:
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    sys.exit(fallback_status)


def launch(spec, bwrap, mounts, python, log):
    forwarded = forwarded_signals()
    propagate = propagate_signals()
    state = {"pid": None, "pending": [], "received": set()}

    def on_signal(signum, frame):
        state["received"].add(signum)
        if propagate:
            if state["pid"] is None:
                state["pending"].append(signum)
            else:
                try:
                    os.kill(state["pid"], signum)
                except OSError:
                    pass
        if signum == signal.SIGTSTP:
            os.kill(os.getpid(), signal.SIGSTOP)

    # Block before spawning: the blocked mask is inherited by bwrap, which therefore
    # cannot be killed by a signal sent to the whole group; stage 2 unblocks.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    for sig in forwarded:
        try:
            signal.signal(sig, on_signal)
        except (OSError, ValueError):
            pass
    spec_fd = _memfd("standin-spec", json.dumps(spec).encode("utf-8", "surrogateescape"))
    code_fd = _memfd("standin-stage2", STAGE2_SOURCE.encode())
    stage2 = [python, "-I", "-S", "/proc/self/fd/%d" % code_fd, str(spec_fd), str(code_fd)]
    info_r = None
    log.debug("%s: running %s" % (STANDIN, " ".join(([bwrap] + mounts + ["--"] if bwrap else []) + spec["argv"])))
    try:
        if bwrap:
            info_r, info_w = os.pipe()
            argv = [bwrap, "--die-with-parent", "--info-fd", str(info_w)] + mounts + ["--"] + stage2
            proc = subprocess.Popen(argv, pass_fds=(spec_fd, code_fd, info_w))
            os.close(info_w)
        else:
            proc = subprocess.Popen(stage2, pass_fds=(spec_fd, code_fd))
            state["pid"] = proc.pid
    except OSError as exc:
        log.fatal("%s: could not start %s: %s" % (STANDIN, bwrap or python, go_err(exc)))
    finally:
        os.close(spec_fd)
        os.close(code_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    if bwrap:
        buf, info = b"", None
        while info is None:
            chunk = os.read(info_r, 4096)
            if not chunk:
                break
            buf += chunk
            try:
                info = json.loads(buf.decode())
            except ValueError:
                continue
        os.close(info_r)
        if info is None:
            status = proc.wait()
            log.fatal(
                "container creation failed: %s: bwrap could not set up the mounts (exit status %d, "
                "see its message above)" % (STANDIN, status)
            )
        state["pid"] = int(info["child-pid"])
        pending, state["pending"] = state["pending"], []
        for sig in pending:
            try:
                os.kill(state["pid"], sig)
            except OSError:
                pass

    status = proc.wait()
    if status < 0:  # the direct child (stage 2 / command, or bwrap) died of a signal
        _reraise(-status, 128 - status)
    if bwrap and status > 128:
        sig = status - 128
        if sig in state["received"] or sig == signal.SIGKILL:
            _reraise(sig, status)
    sys.exit(status)


# Stage 2 runs inside the mount namespace, started by bwrap (or directly without it) as
# ``python -I -S /proc/self/fd/CODE SPEC CODE`` (the source below in a memfd); self-contained,
# so that it does not depend on where this file is, nor on the interpreter's home being
# visible (--contain hides the home).
STAGE2_SOURCE = r'''
import json, os, signal, stat, sys

def go_err(exc):
    text = os.strerror(exc.errno)
    return text[:1].lower() + text[1:]

def fatal(text):
    sys.stderr.write("FATAL:   " + text + "\n")
    sys.stderr.flush()
    os._exit(255)

def look_path(name, env_path, cwd):
    """mvdan.cc/sh interp.LookPathDir with its findExecutable (the runtime's lookup)."""
    def check(path):
        if not os.path.isabs(path):
            path = os.path.normpath(os.path.join(cwd, path))
        try:
            st = os.stat(path)
        except OSError as exc:
            raise LookupError("stat %s: %s" % (path, go_err(exc)))
        if stat.S_ISDIR(st.st_mode):
            raise LookupError("is a directory")
        if not st.st_mode & 0o111:
            raise LookupError("permission denied")
        return path
    if "/" in name:
        return check(name)
    for elem in (env_path.split(":") if env_path else [""]):
        try:
            return check("./" + name if elem in ("", ".") else os.path.join(elem, name))
        except LookupError:
            continue
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise LookupError("%s: executable file not found in $PATH" % quoted)

def main(fd, code_fd):
    os.close(code_fd)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    spec = json.loads(b"".join(chunks).decode("utf-8", "surrogateescape"))
    env = {k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape") for k, v in spec["env"].items()}
    try:
        os.chdir(spec["cwd"])
    except OSError as exc:
        if spec["custom_cwd"]:
            fatal("failed to set working directory: chdir %s: %s" % (spec["cwd"], go_err(exc)))
        try:
            os.chdir(spec["home"])
        except OSError:
            os.chdir("/")
    cwd = os.getcwd()
    env[b"PWD"] = os.fsencode(cwd)
    argv = spec["argv"]
    try:
        argv[0] = look_path(argv[0], os.fsdecode(env.get(b"PATH", b"")), cwd)
    except LookupError as exc:
        fatal(str(exc))
    if spec["no_umask"]:
        os.umask(0o022)
    for sig in signal.valid_signals():
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        os.execve(argv[0], argv, env)
    except OSError as exc:
        error = exc
        if exc.errno == 8:                     # ENOEXEC: the runtime retries with /bin/sh
            argv = ["/bin/sh"] + argv
            try:
                os.execve(argv[0], argv, env)
            except OSError as exc2:
                error = exc2
        if error.errno == 2:
            fatal("exec %s failed: a shared library is likely missing in the image" % argv[0])
        fatal("exec %s failed: %s" % (argv[0], go_err(error)))

main(int(sys.argv[1]), int(sys.argv[2]))
'''


def stage2_python(hidden, log):
    """An interpreter (and its standard library) that the container's mounts do not hide."""

    def visible(*paths):
        for path in paths:
            for h in hidden:
                h = h.rstrip("/") or "/"
                if path == h or path.startswith(h + "/"):
                    return False
        return True

    candidates = [(sys.executable, os.path.realpath(sys.base_prefix))]
    for path in (shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if path and os.access(path, os.X_OK):
            candidates.append((path, os.path.dirname(os.path.dirname(os.path.realpath(path)))))
    for path, prefix in candidates:
        if visible(path, os.path.realpath(path), prefix):
            return path
    log.fatal(
        "%s: no Python interpreter for the stand-in's stage 2 stays visible with these mounts "
        "(hidden: %s)" % (STANDIN, ", ".join(hidden))
    )


# --------------------------------------------------------------------------
# exec

_OS_DIRS = ("/", "/etc", "/bin", "/mnt", "/usr", "/var", "/opt", "/sbin", "/lib", "/lib64")


def refuse(flavour, what, log):
    log.fatal(
        "%s: %s of %s is not emulated by this stand-in (tests/bin/container_standin.py); "
        "see its docstring" % (STANDIN, what, flavour.cmd)
    )


def run_exec(flavour, args, log):
    flags = exec_flagset(flavour)
    try:
        positional = flags.parse(args)
    except FlagError as exc:
        cobra_error(flavour, "exec", 'Error for command "exec": %s\n\n' % exc, flags.usage())
    if flags["help"].value:
        sys.stdout.write(exec_usage(flavour, flags))
        sys.exit(0)
    if len(positional) < 2:
        cobra_error(
            flavour,
            "exec",
            'Error for command "exec": requires at least 2 arg(s), only received %d\n\n' % len(positional),
            usage=exec_usage(flavour, flags),
        )
    flags.from_environment(flavour, log)
    image, command = positional[0], positional[1:]

    if flags["compat"].value:
        for name in ("containall", "no-init", "no-umask", "no-eval", "writable-tmpfs"):
            flags[name].value = True
            flags[name].changed = True
    if flags["containall"].value:
        for name in ("contain", "cleanenv", "pid", "ipc"):
            flags[name].value = True
    for flag in flags.flags:
        if flag.support == NO and flag.changed and not (flag.kind == BOOL and not flag.value):
            refuse(flavour, "option --" + flag.name, log)
    no_mount = set()
    for value in flags["no-mount"].value:
        value = value.strip()
        if value in ("tmp", "home", "cwd"):
            no_mount.add(value)
        elif value in ("bind-paths", "hostfs", "/etc/localtime", "/etc/hosts"):
            continue
        elif value:
            refuse(flavour, "--no-mount %s" % value, log)

    cleanenv, contain = flags["cleanenv"].value, flags["contain"].value
    if flags["nv"].value and not flags["no-nv"].value:
        nv_check(log)

    binds = []
    try:
        if flavour is APPTAINER:
            binds = parse_bind_paths(flags["bind"].value)
        else:
            for path in flags["bind"].value:
                binds += parse_bind_paths([path])
    except BindError as exc:
        log.fatal(
            "while parsing bind path: %s"
            % ("while getting bind path: %s" % exc if not str(exc).startswith("wrong") else exc)
        )
    for text in flags["mount"].value:
        try:
            binds += parse_mount(text)
        except BindError as exc:
            log.fatal("while parsing mount %s: %s" % (go_quote(text), exc))
    for bind in binds:
        if "image-src" in bind["options"] or "id" in bind["options"]:
            refuse(flavour, "binding from inside an image (image-src/id)", log)

    abs_image, kind, env_source = open_image(image, log)

    host_env = dict(os.environ)
    env_prefix = flavour.env_prefixes[0]
    extra = {}
    if flags["env-file"].value:
        extra.update(evaluate_env_file(flags["env-file"].value, abs_image, log))
    for key, value in flags["env"].value.items():
        if key in extra and flags["env-file"].value:
            log.warning("Ignore environment variable %s from %s: override from --env" % (key, flags["env-file"].value))
        extra[key] = value
    for key, value in extra.items():
        if not key:
            log.warning("Ignore environment variable %s=%s: variable name missing" % (key, value))
            continue
        host_env[env_prefix + key] = value

    user_home = pwd.getpwuid(os.getuid()).pw_dir
    custom_home = flags["home"].changed and flags["home"].value != ""
    if custom_home:
        home_src, _, home_dst = flags["home"].value.partition(":")
        home_dst = home_dst or home_src
    else:
        home_src = home_dst = user_home

    try:
        host_cwd = os.getcwd()
    except OSError:
        log.warning("can't determine current working directory")
        host_cwd = "/"
    target_cwd = flags["pwd"].value or flags["cwd"].value
    custom_cwd = bool(target_cwd)

    process, overrides = container_environment(flavour, host_env, cleanenv, home_dst, log)
    if flavour is APPTAINER:
        dests = ",".join(b["dst"] for b in binds)
        for prefix in flavour.cfg_prefixes:
            process[prefix + "APPNAME"] = ""
            process[prefix + "CONTAINER"] = abs_image
            process[prefix + "NAME"] = os.path.basename(abs_image)
            process[prefix + "BIND"] = dests
            if flags["no-eval"].value:
                process[prefix + "NO_EVAL"] = "1"
        process["APPTAINER_COMMAND"] = "exec"
    else:
        process["SINGULARITY_APPNAME"] = ""
        process["SINGULARITY_CONTAINER"] = abs_image
        process["SINGULARITY_NAME"] = os.path.basename(abs_image)
        process["SINGULARITY_BIND"] = ",".join(flags["bind"].value)
        if flags["no-eval"].value:
            process["SINGULARITY_NO_EVAL"] = "1"
        process["SINGULARITY_COMMAND"] = "exec"

    # Container creation: bind sources (and a custom home) must exist.
    mount_list = ([{"src": home_src, "dst": home_dst, "options": {}}] if custom_home else []) + binds
    for bind in mount_list:
        if not os.path.exists(bind["src"]):
            log.fatal(
                "container creation failed: %smount %s->%s error: while mounting %s: mount source %s "
                "doesn't exist" % (flavour.mount_hook_prefix, bind["src"], bind["dst"], bind["src"], bind["src"])
            )

    final_env = run_action_script(
        flavour, kind, env_source, process, overrides, flags["no-eval"].value, target_cwd or host_cwd, log
    )

    # The current directory is bound unless --contain, --no-mount cwd, / or a system directory.
    cwd_path = os.path.normpath(host_cwd)
    bind_cwd = not contain and "cwd" not in no_mount
    if bind_cwd and cwd_path == "/":
        log.warning("No current working directory set: skipping mount")
        bind_cwd = False
    if bind_cwd and any(
        p in _OS_DIRS or p.startswith(("/sys", "/proc", "/dev")) for p in (cwd_path, os.path.realpath(cwd_path))
    ):
        bind_cwd = False

    bwrap, why_not = bwrap_usable(log)
    mounts = []
    if bwrap:
        mounts = ["--bind", "/", "/"] + (["--dev", "/dev"] if contain else ["--dev-bind", "/dev", "/dev"])
        if flags["ipc"].value:
            mounts += ["--unshare-ipc"]
        if custom_home:
            mounts += ["--bind", os.path.abspath(home_src), home_dst]
        elif contain:
            mounts += ["--tmpfs", home_dst]
        elif not flags["no-home"].value and "home" not in no_mount and os.path.isdir(user_home):
            mounts += ["--bind", user_home, user_home]
        if contain:
            mounts += ["--tmpfs", "/tmp", "--tmpfs", "/var/tmp"]
        elif "tmp" not in no_mount:
            for tmp in ("/tmp", "/var/tmp"):
                if os.path.isdir(tmp):
                    mounts += ["--bind", tmp, tmp]
        if bind_cwd:
            mounts += ["--bind", cwd_path, cwd_path]
        for bind in binds:
            mode = "--ro-bind" if "ro" in bind["options"] else "--bind"
            mounts += [mode, os.path.abspath(bind["src"]), bind["dst"]]
        if not flags["writable-tmpfs"].value:
            mounts += ["--remount-ro", "/"]
    else:
        sys.stderr.write(
            "%s: %s; running the command directly on the host: binds to another destination, "
            ":ro, --contain and the read-only image root are NOT emulated\n" % (STANDIN, why_not)
        )
        sys.stderr.flush()

    # Paths whose host content the container does not see (for the stand-in's own stage 2).
    moved = binds + ([{"src": home_src, "dst": home_dst}] if custom_home else [])
    hidden = [m["dst"] for m in moved if os.path.realpath(m["src"]) != os.path.realpath(m["dst"])]
    if contain:
        hidden += ["/tmp", "/var/tmp", "/dev"] + ([] if custom_home else [home_dst])
    spec = {
        "argv": command,
        "env": final_env,
        "cwd": target_cwd or host_cwd,
        "custom_cwd": custom_cwd,
        "home": home_dst,
        "no_umask": flags["no-umask"].value,
    }
    launch(spec, bwrap, mounts, stage2_python(hidden if bwrap else [], log), log)


# --------------------------------------------------------------------------
# main


def main(argv):
    if len(argv) < 2 or argv[0] != "--as" or argv[1] not in FLAVOURS:
        sys.stderr.write(
            "usage: container_standin.py --as apptainer|singularity ARGS... "
            "(normally run through tests/bin/apptainer or tests/bin/singularity)\n"
        )
        sys.exit(2)
    flavour = FLAVOURS[argv[1]]
    args = argv[2:]
    log = Log()
    level = os.environ.get(flavour.cfg_prefixes[0] + "MESSAGELEVEL", "")
    if re.match(r"^-?\d+$", level):
        log.level = int(level)

    flags = FlagSet(_GLOBAL_FLAGS)
    try:
        rest = flags.parse(args)
    except FlagError as exc:
        words = [a for a in args if not a.startswith("-")]
        name = words[0] if words and words[0] in flavour.commands else flavour.cmd
        options = exec_flagset(flavour).usage() if name == "exec" else flags.usage()
        cobra_error(flavour, name, "Error for command %s: %s\n\n" % (go_quote(name), exc), options)
    for name in ("debug", "silent", "quiet", "verbose"):
        for prefix in flavour.cfg_prefixes:
            value = os.environ.get(prefix + name.upper(), "").strip()
            if value and not flags[name].changed:
                try:
                    flags[name].set(value)
                except ValueError:
                    pass
    if flags["debug"].value:
        log.level = 5
    elif flags["verbose"].value:
        log.level = 4
    elif flags["quiet"].value:
        log.level = -1
    elif flags["silent"].value:
        log.level = -3
    else:
        log.level = max(log.level, 1)

    if flags["version"].value:
        sys.stdout.write("%s version %s\n" % (flavour.package, flavour.version))
        return
    if flags["help"].value or (rest and rest[0] == "help"):
        sys.stdout.write(root_usage(flavour))
        return
    if not rest:
        sys.stdout.write(root_usage(flavour))
        sys.stdout.write("Run '%s --help' for more detailed usage information.\n" % flavour.cmd)
        sys.exit(1)
    command = rest[0]
    if command == "exec":
        run_exec(flavour, rest[1:], log)
    elif command == "version":
        sys.stdout.write(flavour.version + "\n")
    elif command in flavour.commands:
        refuse(flavour, "the %s command" % go_quote(command), log)
    else:
        suggestions = [c for c in flavour.commands if levenshtein(command, c) <= 2 or c.startswith(command)]
        message = "Error: unknown command %s for %s" % (go_quote(command), go_quote(flavour.cmd))
        if suggestions:
            message += "\n\nDid you mean this?\n" + "".join("\t%s\n" % s for s in suggestions)
        sys.stderr.write(message + "\n\n")
        sys.stdout.write(root_usage(flavour))
        sys.stdout.write("Run '%s --help' for more detailed usage information.\n" % flavour.cmd)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
