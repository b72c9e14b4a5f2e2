"""A health file for container health checks: the agent's own view of its health, not "process exists".

While the agent runs, a daemon thread rewrites a small JSON file every `interval` seconds (atomically:
write + rename) with the loop's liveness (the event loop is waiting for events, or has been busy with
one for less than `max_busy` seconds) and whether the broker connection is up. `check()` reads it in
another process: healthy only when the file is fresh (a frozen or dead agent stops rewriting it), the
loop is alive and the broker is connected.

`EDGE_AGENT_HEALTH_FILE` names the file (the Docker image sets it to a tmpfs path); unset, the agent
writes none. This module imports only the standard library, so `python -m edge_agent.health` (the
image's HEALTHCHECK) starts in a few tens of milliseconds: exit 0 healthy, 1 not, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV_FILE = "EDGE_AGENT_HEALTH_FILE"
DEFAULT_INTERVAL = 5.0
# A fresh file is at most this many intervals old: one missed write (a slow disk, a GC pause) is not
# a failure, two more are.
STALE_INTERVALS = 3


def health_path(env: dict[str, str] | None = None) -> Path | None:
    """The health file named by `EDGE_AGENT_HEALTH_FILE`, or None."""
    value = (os.environ if env is None else env).get(ENV_FILE, "").strip()
    return Path(value) if value else None


class HealthFile:
    """Rewrites `path` every `interval` s with `{"monotonic", "interval", "pid", "loop_alive", "connected"}`.

    Monotonic time (CLOCK_MONOTONIC is system-wide, so the checking process compares it directly)
    keeps a wall-clock step from making a healthy agent look stale. `stop()` removes the file: a
    stopped agent has no health to report.
    """

    def __init__(
        self,
        path: Path,
        loop_alive: Callable[[], bool],
        connected: Callable[[], bool],
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.loop_alive = loop_alive
        self.connected = connected
        self.interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-file", daemon=True)
        self.writes = 0

    def start(self) -> HealthFile:
        self.write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def snapshot(self) -> dict[str, object]:
        def safe(probe: Callable[[], bool]) -> bool:
            try:
                return bool(probe())
            except Exception:
                log.exception("health probe failed")
                return False

        return {"monotonic": self._clock(), "interval": self.interval, "pid": os.getpid(),
                "loop_alive": safe(self.loop_alive), "connected": safe(self.connected)}  # fmt: skip

    def write(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.path)
            self.writes += 1
        except OSError as exc:  # never fatal: the health check then reports the file as stale
            log.warning("cannot write the health file %s: %s", self.path, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()


def check(path: Path, clock: Callable[[], float] = time.monotonic) -> tuple[bool, str]:
    """(healthy, reason) from the health file at `path`."""
    try:
        doc = json.loads(path.read_text())
        written, interval = float(doc["monotonic"]), float(doc["interval"])
        loop_alive, connected = doc["loop_alive"], doc["connected"]
    except FileNotFoundError:
        return False, f"no health file {path}: the agent is not running (or EDGE_AGENT_HEALTH_FILE differs)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable health file {path}: {exc}"
    age = clock() - written
    if age > STALE_INTERVALS * interval:
        return False, f"health file not updated for {age:.0f} s: the agent is stuck or gone"
    if loop_alive is not True:
        return False, "event loop stuck: one event has been in hand too long"
    if connected is not True:
        return False, "not connected to the MQTT broker"
    return True, f"healthy: loop alive, broker connected (updated {age:.1f} s ago)"


def main(argv: list[str] | None = None) -> int:
    """`python -m edge_agent.health [FILE]`: exit 0 healthy, 1 unhealthy, 2 no file configured."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else health_path()
    if path is None:
        print(f"no health file: pass its path or set {ENV_FILE}", file=sys.stderr)
        return 2
    healthy, reason = check(path)
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
