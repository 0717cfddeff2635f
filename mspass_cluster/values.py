"""What a valid value of an option is: each kind's check, with the fix in its error (pure).

:func:`coerce` turns a value from any source (argument, YAML, environment)
into the option's type, or raises :class:`~mspass_cluster.errors.ConfigError`
naming the value and what to write instead.
"""

from __future__ import annotations

import os
import re

from dask.utils import parse_bytes, parse_timedelta

from .dbstorage import check_local_dir
from .errors import ConfigError
from .options import CHOICES, Option

__all__ = ["coerce", "check_text", "parse_walltime", "MIN_MEMORY"]


_WALLTIME = re.compile(
    r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
    r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)"
    r"|(?P<mm>\d+):(?P<ss>\d+)"
    r"|(?P<minutes>\d+))$"
)


def parse_walltime(value: str) -> int:
    """Seconds in a Slurm time limit.

    Accepts Slurm's formats: ``minutes``, ``minutes:seconds``,
    ``hours:minutes:seconds``, ``days-hours``, ``days-hours:minutes`` and
    ``days-hours:minutes:seconds``.

    Raises
    ------
    ConfigError
        When ``value`` is in none of these formats or is zero.

    Examples
    --------
    >>> parse_walltime("01:30:00")
    5400
    >>> parse_walltime("2-00")
    172800
    """
    match = _WALLTIME.match(str(value).strip())
    if not match:
        raise ConfigError(
            f"walltime={value!r} is not a Slurm time limit. Use one of Slurm's formats: "
            "'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM' or 'D-HH:MM:SS', e.g. walltime='02:00:00'."
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        seconds = g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "h" in g:
        seconds = g["h"] * 3600 + g["m"] * 60 + g["s"]
    elif "mm" in g:
        seconds = g["mm"] * 60 + g["ss"]
    else:
        seconds = g["minutes"] * 60
    if seconds <= 0:
        raise ConfigError(f"walltime={value!r} is zero; give a positive limit, e.g. walltime='01:00:00'.")
    return seconds


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(str(value))
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number; give e.g. {name}={max(minimum, 1)}.") from None
        value = as_int
    if value < minimum:
        raise ConfigError(f"{name}={value!r} is below {minimum}; give {name}={max(minimum, 1)} or more.")
    return value


def coerce(option: Option, value):
    """``value`` as option's type, checked; ConfigError naming the value and the fix.

    Text of every kind is checked for control characters first (see
    :func:`check_text`), before any other check, so the message says what is
    really wrong.
    """
    name = option.name
    if isinstance(value, str):
        _one_line(name, value)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if isinstance(item, str):
                check_text(f"{name}[{index}]", item, tab=name in TAB_ALLOWED)
    if option.kind == "int":
        minimum = 0 if name in ("scheduler_port", "db_restarts", "db_shards") else 1
        number = _check_int(name, value, minimum)
        if name.endswith("_port") and number > 65535:
            raise ConfigError(
                f"{name}={number} is not a TCP port ({minimum} to 65535); give e.g. {name}={option.default or 8786}"
                + (" or 0 for a free one." if minimum == 0 else ".")
            )
        return number
    if option.kind == "float":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}={value!r} is not a number of seconds; give e.g. {name}={option.default}."
            ) from None
        if number <= 0:
            raise ConfigError(f"{name}={value!r} must be positive; give e.g. {name}={option.default}.")
        return number
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not true or false.")
    if option.kind == "list":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
            raise ConfigError(f"{name}={value!r} must be a list of strings, e.g. {name}={option.default or ['...']!r}.")
        return [_one_line(name, str(v)) for v in value]
    if option.kind == "memory":
        return _check_memory(name, value)
    if option.kind == "choice":
        if value not in CHOICES[name]:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, CHOICES[name]))}.")
        return value
    if option.kind == "security":
        return _check_security(name, value)
    if option.kind == "walltime":
        parse_walltime(value)
        return str(value).strip()
    if option.kind == "lifetime":
        return _check_lifetime(name, value)
    if option.kind == "ready":
        return check_ready(name, value)
    if option.kind == "node_path":
        try:
            return check_local_dir(name, value)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if option.kind == "path":
        # Checked again once expanded: a variable's value lands in the scripts too.
        return _one_line(name, os.path.abspath(os.path.expanduser(os.path.expandvars(str(value)))))
    if not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string.")
    return _one_line(name, value)


def check_ready(name, value):
    """A count of worker nodes (int, 0 or more) or a share of them (a float in (0, 1], or ``'90%'``).

    >>> check_ready("ready_workers", "90%"), check_ready("ready_workers", "0.5"), check_ready("ready_workers", "12")
    (0.9, 0.5, 12)
    """
    if value is None:
        return None
    fix = f"give a number of worker nodes ({name}=100), or a share of them ({name}=0.9 or {name}='90%')."
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number; {fix}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}={value!r} is below 0; {fix}")
        return value
    text = str(value).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
        elif isinstance(value, float) or "." in text:
            share = float(text)
        else:
            return check_ready(name, int(text))
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a number; {fix}") from None
    if not 0 < share <= 1:
        raise ConfigError(f"{name}={value!r} is not a share between 0 and 1 (or 0% and 100%); {fix}")
    return share


def _check_security(name, value):
    """``True``/``False`` (or their spellings in YAML and the environment), or a ``distributed.Security``."""
    from distributed.security import Security

    if isinstance(value, Security):
        if not value.require_encryption or not value.tls_ca_file:
            raise ConfigError(
                f"{name}={value!r} does not require encryption with a CA: the nodes would accept anyone. Give "
                f"Security(require_encryption=True, tls_ca_file=..., tls_worker_cert=..., ...), or {name}=True for "
                "the cluster's own fresh credentials."
            )
        for attribute in ("tls_ca_file", "tls_worker_cert"):
            path = getattr(value, attribute)
            if not path or not os.path.isfile(path):
                raise ConfigError(
                    f"{name}: the distributed.Security's {attribute}={str(path)[:60]!r} is not a file. The worker "
                    "jobs read their credentials from files: give paths (on a file system the nodes share) for "
                    f"tls_ca_file, tls_worker_cert and tls_worker_key, or {name}=True for the cluster's own."
                )
        return value
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(
        f"{name}={value!r} is not true, false or a distributed.Security; give {name}=True (the default) or, "
        f"to run open to every user of the machine, {name}=False."
    )


#: Options whose values are lines of shell the user writes: a tab there is indentation, harmless.
TAB_ALLOWED = ("job_script_prologue",)

_CONTROL_NAMES = {
    "\n": "a line break (\\n)",
    "\r": "a carriage return (\\r)",
    "\0": "a NUL (\\x00)",
    "\t": "a tab (\\t)",
}


def check_text(name: str, value: str, *, tab: bool = False) -> str:
    """``value``, if it holds no control character (C0 or DEL; a tab only with ``tab``), else ConfigError.

    Values land in job scripts, in ``#SBATCH`` lines and shell lines: a line
    break or NUL there would end the line and start one of the value's own,
    and the other control characters hide, in the script and in every
    message, what is really there. No Slurm name, path or argument needs one.

    >>> check_text("partition", "normal")
    'normal'
    """
    for position, char in enumerate(value):
        if (char < " " and not (tab and char == "\t")) or char == "\x7f":
            what = _CONTROL_NAMES.get(char, f"the control character {char!r}")
            # Options are named as written in Python (work_dir='...'), anything else as typed (--work-dir '...').
            option = re.fullmatch(r"[a-z_]+(\[\d+\])?", name) is not None
            shown = f"{name}={value!r}" if option else f"{name} {value!r}"
            where = " (check the YAML file or variable it came from)" if option else ""
            raise ConfigError(
                f"{shown} holds {what} at position {position}: values are written into the job scripts, where a "
                f"line break starts a line of its own and control characters hide what runs. Give {name} without "
                f"it{where}."
            )
    return value


def _one_line(name, value: str) -> str:
    return check_text(name, value, tab=name in TAB_ALLOWED)


#: The least memory a Dask worker process, or the database, can run in.
MIN_MEMORY = 256 * 2**20


def _check_memory(name, value) -> str:
    """An amount of memory with its unit, at least :data:`MIN_MEMORY`."""
    text = str(value).strip()
    if re.fullmatch(r"[0-9.]+", text):
        raise ConfigError(
            f"{name}={value!r} has no unit: Slurm reads a bare number as megabytes, Dask as bytes. "
            f"Write the unit, e.g. {name}='{text}MB' or {name}='16GiB'."
        )
    try:
        number = parse_bytes(text)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{name}={value!r} is not an amount of memory; give a number with a unit, e.g. {name}='16GiB' or '4000MB'."
        ) from None
    if number < MIN_MEMORY:
        raise ConfigError(
            f"{name}={value!r} is too little: a Dask worker process or the database needs at least 256MiB. "
            f"Give e.g. {name}='16GiB'."
        )
    return text


def _check_lifetime(name, value) -> str:
    """``auto``, ``none``, or a duration normalised to ``'<seconds>s'``."""
    text = str(value).strip().lower()
    if text in ("auto", "none"):
        return text
    try:
        seconds = parse_timedelta(value if isinstance(value, (int, float)) else text)
    except (ValueError, TypeError, KeyError):
        seconds = None
    if seconds is None or seconds <= 0:
        raise ConfigError(
            f"{name}={value!r} is not a positive duration; give e.g. {name}='55m' or '3300s', "
            f"or {name}='auto' (just before walltime) or 'none'."
        )
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds}s"
