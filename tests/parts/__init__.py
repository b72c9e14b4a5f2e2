"""Process managers for the real parts the integration tests run against, one module per part.

Every part is started on free ports of 127.0.0.1, in its own session (process group), with its
output appended to ``<workdir>/<name>.log`` (``.log_path``). ``stop()`` sends SIGTERM, waits a
bounded time, then SIGKILLs; ``kill()`` is an abrupt outage; ``restart()`` comes back on the same
ports with the same data. Every wait has a timeout and fails with :class:`PartError` carrying the
tail of the part's log.

    base       free ports, log tails, PartError, ManagedProcess
    mosquitto  the MQTT broker            s3      the S3 server (SeaweedFS)
    camera     the RTSP camera simulator  probe   an independent MQTT client for checks
    media      ffprobe and MP4 box checks agent   the agent process and its agent.yaml
"""

from parts.agent import AgentProcess, all_log_tails, write_config
from parts.base import (
    CAMSIM,
    LOCALHOST,
    ROOT,
    SYSTEM_PYTHON,
    ManagedProcess,
    PartError,
    free_port,
    free_ports_with_grpc,
    tail,
    tcp_accepts,
)
from parts.camera import CameraSim
from parts.media import ffprobe_info, moov_before_mdat, mp4_top_level_boxes
from parts.mosquitto import Mosquitto
from parts.probe import Message, MqttProbe
from parts.s3 import SeaweedS3, weed_binary

__all__ = [
    "CAMSIM", "LOCALHOST", "ROOT", "SYSTEM_PYTHON", "AgentProcess", "CameraSim", "ManagedProcess", "Message",
    "Mosquitto", "MqttProbe", "PartError", "SeaweedS3", "all_log_tails", "ffprobe_info", "free_port",
    "free_ports_with_grpc", "moov_before_mdat", "mp4_top_level_boxes", "tail", "tcp_accepts", "weed_binary",
    "write_config",
]  # fmt: skip
