"""Shared by every part: free ports, log tails, the error type and `ManagedProcess` (start, stop, kill, restart)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

ROOT = Path(__file__).resolve().parents[2]
CAMSIM = Path(__file__).resolve().parents[1] / "camsim.py"
SYSTEM_PYTHON = "/usr/bin/python3"
LOCALHOST = "127.0.0.1"


class PartError(RuntimeError):
    """A part failed to start, stop or answer in time; the message carries its log tail."""


# --------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
        return True


def free_ports_with_grpc(count: int, offset: int = 10000, low: int = 20000, high: int = 55535) -> list[int]:
    """``count`` distinct free ports below ``high`` whose ``+offset`` gRPC neighbours are free too."""
    chosen: list[int] = []
    taken: set[int] = set()
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randrange(low, high - offset if high > low + offset else high)
        if port in taken or port + offset in taken:
            continue
        if _port_is_free(port) and _port_is_free(port + offset):
            chosen.append(port)
            taken.update({port, port + offset})
            if len(chosen) == count:
                return chosen
    raise PartError(f"could not find {count} free port pairs (port, port+{offset})")


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-64 * 1024 :].decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# ---------------------------------------------------------------------------------- base part


class ManagedProcess:
    """A child process in its own session with a log file, bounded start/stop and restart."""

    name = "process"
    start_timeout = 30.0
    stop_timeout = 10.0

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self.starts = 0

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cwd(self) -> Path:
        return self.workdir

    def prepare(self) -> None:
        """Runs before each (re)start, e.g. to write a config file."""

    def is_ready(self) -> bool:
        return True

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        if self.is_alive():
            raise PartError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.prepare()
        self._log_file = self.log_path.open("ab")
        self._log_offset = self._log_file.tell()
        self.starts += 1
        cmd = self.command()
        self._log_file.write(f"=== start #{self.starts}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.cwd(),
            env=self.env(),
            start_new_session=True,
        )
        try:
            self.wait_until(self.is_ready, self.start_timeout, "become ready")
        except BaseException:
            self.kill()
            raise
        return self

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls ``condition`` until true; fails early if the process exits, late with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise PartError(
                    f"{self.name} exited with {self._proc.returncode} before it could {what}\n"
                    f"{self.log_excerpt()}"
                )
            if condition():
                return
            if time.monotonic() >= deadline:
                raise PartError(f"{self.name} did not {what} within {timeout:.0f} s\n{self.log_excerpt()}")
            time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM the group, wait up to ``timeout``, then SIGKILL. Always reaps; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                if _reap(proc, self.stop_timeout if timeout is None else timeout) is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                    _reap(proc, 10.0)
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers left in the group
            return proc.poll()
        finally:
            self._close_log()

    def kill(self) -> None:
        """SIGKILL the whole group (an abrupt outage) and reap it."""
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGKILL)
        if _reap(proc, 10.0) is None:
            raise PartError(f"{self.name} (pid {proc.pid}) survived SIGKILL for 10 s")
        self._close_log()

    def restart(self, *, hard: bool = False) -> Self:
        """Stop (or kill if ``hard``) and start again on the same ports with the same data dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- logs
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def log_excerpt(self, lines: int = 60) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n{self.log_tail(lines)}\n--- end ---"

    def __enter__(self) -> Self:
        if not self.is_alive():
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} log={self.log_path}>"
