"""Where a command's CPU goes: run it, poll /proc, and attribute CPU seconds to each kind of process
it starts (Ray names its workers ``ray::<Actor>.<method>``, so a Ray Train fit's controller, worker,
placement-group cleaner and Ray Data operators are told apart). Prints JSON.

    python bench/process_cpu.py [--interval 0.5] -- python -m pytest -q tests/test_utility_run.py

Also reports the machine's busy and idle core-seconds over the run (from /proc/stat), which says
whether the command waits or computes. Linux only. A process is counted from the first poll that
sees it to the last, so the CPU of processes that live less than ``--interval`` is missed, and a
Ray worker that runs several tasks is counted under the first one it ran; the machine totals have
no such gap. This is the measurement behind README's "Where the suite's time goes".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
NAMED = ("gcs_server", "raylet", "log_monitor", "dashboard", "runtime_env_agent", "monitor.py", "mlflow", "pytest")


def machine_ticks() -> tuple[int, int]:
    """(busy, idle) clock ticks of every core since boot (/proc/stat's first line)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, idle


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, start time, utime + stime ticks) of ``pid``, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return int(rest[1]), int(rest[19]), int(rest[11]) + int(rest[12])


def kind_of(pid: int) -> str | None:
    """A process's kind: its Ray name (``ray::TrainController.__init__``), one of the Ray daemons,
    or its program's name; None once it is gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    line = " ".join(a.decode(errors="replace") for a in argv)
    if "default_worker.py" in line:
        return "ray::(worker not yet named)"
    return next((name for name in NAMED if name in line), Path(first).name or "?")


def _descends(pid: int, root: int, parents: dict[int, int]) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        if pid not in parents or pid <= 1:
            return False
        pid = parents[pid]
    return False


def measure(command: list[str], interval: float = 0.5) -> dict:
    """Run ``command`` and return its wall time, exit code, the machine's busy/idle core-seconds and
    the CPU seconds of every process it started, by kind."""
    busy0, idle0 = machine_ticks()
    t0 = time.perf_counter()
    proc = subprocess.Popen(command)
    seen: dict[tuple[int, int], list] = {}  # (pid, start) -> [kind, ticks]
    while True:
        done = proc.poll() is not None
        stats = {int(d): s for d in os.listdir("/proc") if d.isdigit() and (s := _stat(int(d))) is not None}
        parents = {pid: s[0] for pid, s in stats.items()}
        for pid, (_, start, ticks) in stats.items():
            key = (pid, start)
            if key in seen:
                seen[key][1] = ticks
                name = seen[key][0]
                if not name.startswith("ray::") or name in ("ray::IDLE", "ray::(worker not yet named)"):
                    # a program may exec another (a pyenv shim); a Ray worker takes its actor's or
                    # task's name once it has one, and keeps its first
                    later = kind_of(pid)
                    if later is not None and later != "ray::IDLE":
                        seen[key][0] = later
            elif _descends(pid, proc.pid, parents) and (name := kind_of(pid)) is not None:
                seen[key] = [name, ticks]
        if done:
            break
        time.sleep(interval)
    wall = time.perf_counter() - t0
    busy1, idle1 = machine_ticks()
    cpu, count = Counter(), Counter()
    for name, ticks in seen.values():
        cpu[name] += ticks / TICK
        count[name] += 1
    return {"command": command, "rc": proc.returncode, "wall_s": round(wall, 1), "cores": os.cpu_count(),
            "machine": {"busy_core_s": round((busy1 - busy0) / TICK, 1), "idle_core_s": round((idle1 - idle0) / TICK, 1)},
            "processes": {"cpu_s": round(sum(cpu.values()), 1),
                          "by_kind": [{"kind": k, "cpu_s": round(v, 1), "processes": count[k]} for k, v in cpu.most_common()]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between polls of /proc")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command given (put it after --)")
    if not Path("/proc/stat").is_file():
        print("error: /proc/stat: not found (Linux only)", file=sys.stderr)
        return 2
    print(json.dumps(measure(command, args.interval), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
