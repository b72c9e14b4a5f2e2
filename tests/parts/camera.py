"""The RTSP camera simulator (tests/camsim.py, GStreamer under Debian's Python) as a managed part."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from parts.base import (
    CAMSIM,
    LOCALHOST,
    SYSTEM_PYTHON,
    ManagedProcess,
    free_port,
    tcp_accepts,
)


class CameraSim(ManagedProcess):
    """The GStreamer RTSP camera simulator (``tests/camsim.py`` under Debian's python3)."""

    name = "camsim"
    start_timeout = 20.0

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        mounts: Sequence[str] = ("cam1",),
        width: int = 1280,
        height: int = 720,
        fps: int = 25,
        user: str | None = None,
        password: str | None = None,
        codec: str = "h264",
        pattern: str = "ball",
        shared: bool = True,
        counter: bool = False,
        address: str = LOCALHOST,
    ) -> None:
        super().__init__(workdir)
        if codec not in ("h264", "mjpeg"):
            raise ValueError(f"codec must be h264 or mjpeg, not {codec!r}")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self.host = LOCALHOST  # where the tests reach it
        self.address = address  # what it binds: 0.0.0.0 for containers on a Docker network
        self.port = port if port is not None else free_port()
        self.mounts = tuple(mounts)
        self.width, self.height, self.fps = width, height, fps
        self.user, self.password = user, password
        self.codec = codec
        self.pattern = pattern
        self.shared = shared
        self.counter = counter  # frames carry their wall-clock time (tests/framestamp.py), not `pattern`

    def command(self) -> list[str]:
        cmd = [
            SYSTEM_PYTHON,
            "-u",
            str(CAMSIM),
            "--address",
            self.address,
            "--port",
            str(self.port),
            "--mounts",
            ",".join(self.mounts),
            "--width",
            str(self.width),
            "--height",
            str(self.height),
            "--fps",
            str(self.fps),
            "--pattern",
            self.pattern,
            "--codec",
            self.codec,
            "--shared" if self.shared else "--no-shared",
        ]
        if self.counter:
            cmd.append("--counter")
        if self.user is not None and self.password is not None:
            cmd += ["--user", self.user, "--password", self.password]
        return cmd

    def env(self) -> dict[str, str]:
        # GStreamer's own warnings and errors in camsim.log: what the RTSP server saw when a test's
        # readers got no answer (GST_DEBUG level 2; the default, 0, says nothing).
        return {**super().env(), "GST_DEBUG": "2", "GST_DEBUG_NO_COLOR": "1"}

    def is_ready(self) -> bool:
        return "READY" in self.log_since_start() and tcp_accepts(self.host, self.port)

    def url(
        self, mount: str = "cam1", *, user: str | None = None, password: str | None = None, host: str | None = None
    ) -> str:
        """``rtsp://[user:pass@]127.0.0.1:PORT/mount`` (the simulator's own credentials by default;
        ``host`` for another name of this machine, e.g. ``host.docker.internal`` in a container)."""
        user = self.user if user is None else user
        password = self.password if password is None else password
        cred = f"{user}:{password}@" if user is not None and password is not None else ""
        return f"rtsp://{cred}{host or self.host}:{self.port}/{mount}"
