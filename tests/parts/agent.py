"""The agent itself as a child process, and the `agent.yaml` the tests write for it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import yaml

from parts.base import (
    LOCALHOST,
    ROOT,
    PartError,
    _reap,
    _signal_group,
    tail,
)


class AgentProcess:
    """``python -m edge_agent run --config FILE`` as a child in its own session.

    ``start()`` returns at once: tests wait for the retained ``online`` status themselves.
    """

    name = "agent"

    def __init__(self, config_path: Path, workdir: Path, extra_env: Mapping[str, str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "agent.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._pgids: set[int] = set()
        self.starts = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "edge_agent", "run", "--config", str(self.config_path)]

    def start(self) -> Self:
        if self.is_alive():
            raise PartError(f"agent already running (pid {self.pid})")
        self._close_log()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._log_file = self.log_path.open("ab")
        self.starts += 1
        self._log_file.write(f"=== start #{self.starts}: {' '.join(self.command())}\n".encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        self._pgids.add(self._proc.pid)
        return self

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PartError("agent not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_until_log(self, text: str, timeout: float = 30.0) -> None:
        """Waits until ``text`` appears in the agent's log (fails early if the agent exits)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if not self.is_alive():
                raise AssertionError(
                    f"agent exited ({self.returncode}) before logging {text!r}\n{self.log_excerpt()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(f"agent did not log {text!r} within {timeout} s\n{self.log_excerpt()}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        """Waits for the agent to exit on its own; returns its exit code."""
        proc = self._require()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"agent still running after {timeout} s\n{self.log_excerpt()}") from exc

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM the agent (only), wait; returns (exit code, seconds it took).

        If it is still running after ``timeout`` its whole group is killed and AssertionError raised.
        """
        proc = self._require()
        started = time.monotonic()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill_group()
            raise AssertionError(
                f"agent did not exit within {timeout} s of SIGTERM\n{self.log_excerpt()}"
            ) from exc
        finally:
            self._close_log()
        return code, time.monotonic() - started

    def kill(self) -> int:
        """SIGKILL the agent process only (a crash): its FFmpeg children are orphaned, not killed."""
        proc = self._require()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = proc.wait(10)
        self._close_log()
        return code

    def kill_group(self) -> None:
        """SIGKILL the agent, its process group(s) and its descendants, e.g. FFmpeg in its own session (a power cut)."""
        if self._proc is not None:
            for pid in [self._proc.pid, *self.descendant_pids()]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for pgid in self._pgids:
            _signal_group(pgid, signal.SIGKILL)
        if self._proc is not None:
            _reap(self._proc, 10.0)
        self._close_log()

    def descendant_pids(self) -> list[int]:
        """Live descendants of the agent by parent pid (FFmpeg runs in its own session, outside the group)."""
        if self._proc is None:
            return []
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z":
                    parents[int(entry.name)] = int(fields[1])
        found: list[int] = []
        frontier = {self._proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
            found.extend(sorted(frontier))
        return found

    def ffmpeg_pids(self, mount: str | None = None) -> list[int]:
        """The agent's FFmpeg recorders (optionally only those reading a URL ending in `/mount`)."""
        out = []
        for pid in self.descendant_pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"ffmpeg") or b"segment" not in argv:
                continue
            if mount is None or any(a.endswith(f"/{mount}".encode()) for a in argv):
                out.append(pid)
        return out

    def group_pids(self) -> list[int]:
        """Live pids in the agent's process group(s) (including orphaned children), via /proc."""
        pids: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp in self._pgids and state != "Z":
                pids.append(int(entry.name))
        return sorted(pids)

    def stop(self, timeout: float = 30.0) -> None:
        """Teardown: SIGTERM if alive (bounded), then kill whatever is left in its group(s)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(AssertionError):
                self.terminate(timeout)
        self.kill_group()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise PartError("agent not started")
        return self._proc

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    def log_excerpt(self, lines: int = 80) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}\n--- end ---"

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        return f"<AgentProcess pid={pid} log={self.log_path}>"




def write_config(
    path: Path,
    *,
    device_id: str,
    mqtt_port: int,
    topic_prefix: str,
    cameras: Mapping[str, Mapping[str, Any]],
    output_dir: Path,
    storage: Mapping[str, Any],
    recording: Mapping[str, Any] | None = None,
    mqtt: Mapping[str, Any] | None = None,
) -> Path:
    """Writes the agent's YAML config; extra keys in the given dicts are merged over the defaults."""
    config: dict[str, Any] = {
        "device_id": device_id,
        # Functional tests send commands back to back; the rate limit has its own tests (defaults).
        "mqtt": {"host": LOCALHOST, "port": mqtt_port, "topic_prefix": topic_prefix, "command_burst": 1000,
                 **(mqtt or {})},
        "cameras": {
            name: {"rtsp_transport": "tcp", "max_seconds": 3600, **dict(cam)} for name, cam in cameras.items()
        },
        "recording": {
            "output_dir": str(output_dir),
            # EDGE_TEST_AGENT_FFMPEG: run the agents on another FFmpeg build (ffprobe next to it), e.g.
            # the Docker image's headless one; the tests' own checks keep the system FFmpeg.
            "ffmpeg_path": os.environ.get("EDGE_TEST_AGENT_FFMPEG", "ffmpeg"),
            "max_seconds": 3600,
            **(recording or {}),
        },
        "storage": {
            "type": "minio",
            "secure": False,
            "delete_local_after_upload": True,
            "presign_seconds": 86400,
            **storage,
        },
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def all_log_tails(parts: Iterable[Any], lines: int = 60) -> str:
    """One text block with the log tail of every part that has a ``log_path``."""
    blocks = []
    for part in parts:
        log_path = getattr(part, "log_path", None)
        if log_path is None:
            continue
        blocks.append(f"===== {type(part).__name__}: {log_path}\n{tail(Path(log_path), lines)}")
    return "\n".join(blocks)
