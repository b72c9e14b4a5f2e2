"""Checks of recorded media: ffprobe facts and the MP4 box layout."""

from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Any


def ffprobe_info(
    path_or_url: str | os.PathLike[str], timeout: float = 30.0, rtsp_transport: str = "tcp"
) -> dict[str, Any]:
    """Codec facts of the first video stream of a file or URL (duration is NaN when unknown)."""
    target = os.fspath(path_or_url)
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    if target.startswith("rtsp://"):
        cmd += ["-rtsp_transport", rtsp_transport]
    cmd.append(target)
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ffprobe timed out after {timeout} s on {target}") from exc
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace")[-2000:]
        raise AssertionError(f"ffprobe failed ({done.returncode}) on {target}: {stderr}")
    data = json.loads(done.stdout)
    streams: list[dict[str, Any]] = data.get("streams", [])
    fmt: dict[str, Any] = data.get("format", {})
    video = next((s for s in streams if s.get("codec_type") == "video"), {})

    def as_float(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan

    duration = as_float(fmt.get("duration"))
    if math.isnan(duration):
        duration = as_float(video.get("duration"))
    return {
        "codec": video.get("codec_name"),
        "pix_fmt": video.get("pix_fmt"),
        "width": video.get("width"),
        "height": video.get("height"),
        "duration": duration,
        "format_name": fmt.get("format_name"),
        "nb_streams": len(streams),
        "raw": data,
    }


def mp4_top_level_boxes(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """(type, size) of each top-level ISO-BMFF box, handling 64-bit sizes and size 0 (to EOF)."""
    boxes: list[tuple[str, int]] = []
    file_size = os.path.getsize(path)
    with open(path, "rb") as fh:
        offset = 0
        while offset + 8 <= file_size:
            fh.seek(offset)
            header = fh.read(8)
            size = int.from_bytes(header[:4], "big")
            box_type = header[4:8].decode("latin-1")
            if size == 1:
                large = fh.read(8)
                if len(large) < 8:
                    break
                size = int.from_bytes(large, "big")
            elif size == 0:
                size = file_size - offset
            if size < 8:
                break  # corrupt
            boxes.append((box_type, size))
            offset += size
    return boxes


def moov_before_mdat(path: str | os.PathLike[str]) -> bool:
    """True if the file's ``moov`` box precedes its ``mdat`` (i.e. written with +faststart)."""
    types = [t for t, _ in mp4_top_level_boxes(path)]
    if "moov" not in types:
        return False
    return "mdat" not in types or types.index("moov") < types.index("mdat")
