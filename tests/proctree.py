"""The machine's processes as /proc shows them: what the Ray tests check is started and left behind.

A pid can be reused once its process ends, so a process is named by its pid *and* its start time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple


class Proc(NamedTuple):
    name: str  # the kernel's short name (comm), 15 characters at most
    parent: int
    group: int  # process group
    start: int  # clock ticks after boot


def _read(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone meanwhile
        return None
    # the name sits in parentheses and may itself contain spaces or parentheses
    name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, waiting to be reaped
        return None
    return Proc(name, int(fields[1]), int(fields[2]), int(fields[19]))


def processes() -> dict[int, Proc]:
    """Every live process."""
    return {int(e): p for e in os.listdir("/proc") if e.isdigit() and (p := _read(int(e))) is not None}


def descendants(root: int) -> dict[int, Proc]:
    """Every live process below ``root``."""
    children: dict[int, list[int]] = {}
    everyone = processes()
    for pid, proc in everyone.items():
        children.setdefault(proc.parent, []).append(pid)
    found: dict[int, Proc] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = everyone[pid]
        todo.extend(children.get(pid, []))
    return found


def still_running(procs: Mapping[int, Proc]) -> list[str]:
    """Those of ``procs`` that are still alive, as 'name (pid)'."""
    return [
        f"{p.name} ({pid})"
        for pid, p in procs.items()
        if (now := _read(pid)) is not None and now.start == p.start
    ]


def command(pid: int) -> str:
    """The process's command line, '' if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_ray_worker(command_line: str) -> bool:
    """A Ray worker (idle, or running a task or an actor), whether or not it has retitled itself yet.

    A worker starts as ``python .../default_worker.py`` and later sets its command line to
    ``ray::<what it runs>``, a moment that can come late on a loaded machine; Ray's agents are
    titled ``ray::...Agent`` too and are no workers.
    """
    program = command_line.split(" ", 3)[:3]
    titled = program[0].startswith("ray::") and not program[0].endswith("Agent")
    return titled or any(part.endswith(("setup_worker.py", "default_worker.py")) for part in program)
