"""Keeping the pusher's machine out of what ``push`` publishes: home folder, user name, host name.

A manifest records where things were on the harvesting machine: the model and tokenizer folders
(``models[].path``, ``tokenizer.path``/``name``), a local dataset (``dataset.name``), the command
line (``created_by.command``) and the harvest config (``harvest.config.out`` ...). Published as
they are, they show the pusher's home folder, and with it the user name, to anyone who reads the
repo. :func:`redact_machine` rewrites every string of a JSON object, its keys included (the
tokenizer's ``extended_by`` is keyed by model name, often a local folder): an absolute path under
the user's home folder becomes ``~/...``; in any other absolute path, a folder named like the user
or the host becomes ``<user>`` / ``<host>``. Relative paths, Hub ids and all other values are kept.

User and host names shorter than 3 characters (a host ``vm``, a user ``ai``), and the user name
``root``, are not replaced: they name no one, and as folder names they are common words
(``/var/lib/vm``, ``/dev/root``), which replacing would garble. The home folder is written ``~``
whatever its name (``/root/...`` becomes ``~/...`` for root).
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MachineNames", "redact_machine", "redact_text"]

# Where an absolute path may start inside a longer string: where no path character is right before
# it, right after a "name/" (a metric key "eval/ev/" + a model folder "/home/al/m" + "/hook"), or
# right after a URL's "://" (the path of "file:///home/al/x").
_PATH_START = r"(?:(?<![\w.~/-])|(?<=[\w.~-]/)|(?<=://))"

# An absolute path (or one already turned into ~/...): from such a start to whitespace, a quote or a
# separator. Never from a "//": "hf://alice/x" is a Hub id (public, and needed as it is), not a path.
_PATH_RE = re.compile(_PATH_START + r"(?:~(?=/)|/(?!/))[^\s'\"=,;]*")

# Names too common to identify anyone, yet common as folder names: never replaced (see the module doc).
_MIN_NAME = 3
_GENERIC_USERS = {"root"}


def _identifying(name: str) -> bool:
    """Whether a user or host name is worth replacing in paths (long enough, and not ``root``)."""
    return len(name) >= _MIN_NAME and name not in _GENERIC_USERS


@dataclass(frozen=True)
class MachineNames:
    """What identifies the machine and user a push runs as (all but ``homes`` matched as whole folder names)."""

    homes: tuple[str, ...]
    """Absolute home folders (``$HOME``, the password database's entry, their resolved forms), longest first."""
    users: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()

    @staticmethod
    def here() -> MachineNames:
        """The names of this machine and of the user running this process."""
        homes: set[str] = set()
        users: set[str] = set()
        candidates = [os.path.expanduser("~"), os.environ.get("HOME", "")]
        try:
            import pwd

            entry = pwd.getpwuid(os.getuid())
            candidates.append(entry.pw_dir)
            users.add(entry.pw_name)
        except (ImportError, KeyError):  # no password database (Windows), or an unnamed uid (containers)
            pass
        for home in candidates:
            for form in (home, os.path.realpath(home) if home else ""):
                form = form.rstrip("/")
                if len(Path(form).parts) >= 2:  # never "/" itself: that would rewrite every path
                    homes.add(form)
        try:
            users.add(getpass.getuser())
        except (OSError, KeyError):  # no LOGNAME/USER and no password entry
            pass
        host = socket.gethostname()
        hosts = {host, host.split(".")[0]} - {"", "localhost"}
        return MachineNames(tuple(sorted(homes, key=len, reverse=True)), tuple(sorted(users - {""})),
                            tuple(sorted(hosts)))


def redact_text(text: str, names: MachineNames) -> str:
    """``text`` with every absolute path under a home folder written ``~/...``, and folders named like
    the user or the host written ``<user>`` / ``<host>`` in the absolute paths left."""
    for home in names.homes:
        # The whole folder only: /home/al is not a prefix of /home/alice, nor /root of /rootfs.
        text = re.sub(rf"{_PATH_START}{re.escape(home)}(?![\w.-])", "~", text)
    swap = {**{u: "<user>" for u in names.users if _identifying(u)},
            **{h: "<host>" for h in names.hosts if _identifying(h)}}
    if not swap:
        return text

    def components(match: re.Match[str]) -> str:
        return "/".join(swap.get(part, part) for part in match[0].split("/"))

    return _PATH_RE.sub(components, text)


def redact_machine(obj: Any, names: MachineNames | None = None) -> tuple[Any, list[str]]:
    """A copy of the JSON value ``obj`` with :func:`redact_text` applied to every string, object keys
    included, and where the strings that changed were (``models[0].path``, ``created_by.command``; a key
    as ``tokenizer.extended_by.~/models/ft (key)``, named as published). ``names``: this machine's."""
    names = MachineNames.here() if names is None else names
    changed: list[str] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, str):
            new = redact_text(value, names)
            if new != value:
                changed.append(where)
            return new
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                key = redact_text(k, names) if isinstance(k, str) else k
                here = f"{where}.{key}" if where else str(key)
                if key != k:
                    changed.append(f"{here} (key)")
                    if key in value or key in out:  # "/home/al/m" and "~/m" side by side: keep both, apart
                        key = next(f"{key} ({n})" for n in range(2, len(value) + 2)
                                   if f"{key} ({n})" not in value and f"{key} ({n})" not in out)
                out[key] = walk(v, here)
            return out
        if isinstance(value, list):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(obj, ""), changed
