"""A real Mosquitto broker on a free port (its config, password file and ACL when asked)."""

from __future__ import annotations

import os
from pathlib import Path

from parts.base import (
    LOCALHOST,
    ManagedProcess,
    free_port,
    tcp_accepts,
)


class Mosquitto(ManagedProcess):
    """A Mosquitto 2.x broker with on-disk persistence saved every second."""

    name = "mosquitto"
    start_timeout = 15.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir)
        self.host = LOCALHOST
        self.port = port if port is not None else free_port()
        self.config_path = self.workdir / "mosquitto.conf"
        self.data_dir = self.workdir / "data"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {LOCALHOST}",
            "set_tcp_nodelay true",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "log_dest stderr",  # unbuffered, unlike stdout into a file
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', which cannot write workdir
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return ["mosquitto", "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        return tcp_accepts(self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _saves(self) -> int:
        return self.log_since_start().count("Saving in-memory database")

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Waits until everything the broker held at the call is in its on-disk database.

        Mosquitto logs each autosave as it begins and saves single-threaded, so once two saves
        have begun since the call the first (which began after the call) has completed.
        """
        target = self._saves() + 2
        self.wait_until(lambda: self._saves() >= target, timeout, "save its database twice")
