#!/usr/bin/python3
"""RTSP camera simulator built on the GStreamer RTSP server.

Run it with Debian's ``/usr/bin/python3`` (the GObject bindings are not in the project venv)::

    /usr/bin/python3 tests/camsim.py --port 8554 --mounts cam1,cam2 --codec h264

It binds 127.0.0.1 unless ``--address`` names another address (0.0.0.0: reachable from containers on
a Docker network), prints ``READY`` on stdout once the server is attached to the main loop and exits
cleanly (status 0) on SIGTERM or SIGINT. Killing it with SIGKILL is a camera outage.

``--counter``: instead of a videotestsrc pattern, every frame is made here (an ``appsrc`` fed at the
frame rate from its own streaming thread, timestamped exactly at 1/fps steps that follow wall time)
with the wall-clock time it is due at drawn into its top-left corner as a machine-readable stamp
(``tests/framestamp.py``: 48 bits of ms since the epoch, 16 px blocks). Tests read it back from a
decoded recording to know when a frame in the file was captured.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import framestamp  # noqa: E402  (standard library only, shared with the tests that decode the stamp)

ROLE = "camera-user"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="RTSP camera simulator (GStreamer RTSP server)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--mounts", default="cam1", help="comma-separated mount names, e.g. cam1,cam2")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--pattern", default="ball", help="videotestsrc pattern")
    parser.add_argument("--user", default=None, help="require RTSP basic auth with this user")
    parser.add_argument("--password", default=None)
    parser.add_argument(
        "--shared",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one encoder per mount shared by every client (default on)",
    )
    parser.add_argument("--codec", choices=("h264", "mjpeg"), default="h264")
    parser.add_argument(
        "--counter",
        action="store_true",
        help="draw each frame's wall-clock time as a machine-readable stamp (tests/framestamp.py)",
    )
    args = parser.parse_args(argv)
    if (args.user is None) != (args.password is None):
        parser.error("--user and --password go together")
    if args.port <= 0 or args.width <= 0 or args.height <= 0 or args.fps <= 0:
        parser.error("--port, --width, --height and --fps must be positive")
    if args.counter and (args.width < framestamp.WIDTH or args.height < framestamp.HEIGHT):
        parser.error(f"--counter needs frames of at least {framestamp.WIDTH}x{framestamp.HEIGHT}")
    return args


STAMP_SOURCE = "stampsrc"


def launch_line(args: argparse.Namespace) -> str:
    if args.counter:  # fed and given its caps by StampedFrames (media-configure)
        source = f"appsrc name={STAMP_SOURCE} is-live=true format=time block=false"
    else:
        source = (
            f"videotestsrc is-live=true pattern={args.pattern} "
            f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1"
        )
    if args.codec == "h264":
        encode = (
            f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={2 * args.fps} "
            "! rtph264pay name=pay0 pt=96 config-interval=1"
        )
    else:
        encode = "videoconvert ! video/x-raw,format=I420 ! jpegenc ! rtpjpegpay name=pay0 pt=26"
    return f"( {source} ! {encode} )"


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class StampedFrames:
    """I420 frames with the wall-clock stamp, one per `need-data` of an appsrc, paced to the frame rate.

    The frame is black but for the stamp rows at the top (laid out with GStreamer's default I420
    strides: luma rows rounded up to 4 bytes, chroma to 4 of half the width rounded up to 2).
    """

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.stride = _round_up(width, 4)
        chroma = _round_up(_round_up(width, 2) // 2, 4) * (_round_up(height, 2) // 2)
        self.rest = bytes((framestamp.BLACK,)) * (self.stride * (height - framestamp.HEIGHT)) + bytes((128,)) * (
            2 * chroma
        )
        self.caps = Gst.Caps.from_string(f"video/x-raw,format=I420,width={width},height={height},framerate={fps}/1")

    def frame(self, ms: int) -> bytes:
        row = framestamp.encode_row(ms, self.width) + bytes(self.stride - self.width)
        return row * framestamp.HEIGHT + self.rest

    def attach(self, src: Gst.Element) -> None:
        """Feed `src`: frame n is due at the first frame's time + n / fps, on the monotonic clock
        (GStreamer's too), stamped with the wall-clock time it is due at and timestamped with the
        running time it is due at, so frame times are exact (no push jitter) and follow wall time.
        A late frame is pushed at once, never skipped."""
        src.set_property("caps", self.caps)
        state: dict[str, int | float] = {"n": 0}

        def need_data(appsrc: Gst.Element, _length: int) -> None:
            # On the appsrc's streaming thread: sleep until this frame is due, then push it.
            n = int(state["n"])
            if n == 0:
                clock = appsrc.get_clock()
                running = clock.get_time() - appsrc.get_base_time() if clock is not None else 0
                state.update(mono=time.monotonic(), wall=time.time(), running=max(running, 0))
            offset = n / self.fps
            delay = float(state["mono"]) + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            buf = Gst.Buffer.new_wrapped(self.frame(round((float(state["wall"]) + offset) * 1000)))
            buf.pts = int(state["running"]) + n * Gst.SECOND // self.fps
            buf.duration = Gst.SECOND // self.fps
            state["n"] = n + 1
            appsrc.emit("push-buffer", buf)

        src.connect("need-data", need_data)


def make_auth(user: str, password: str) -> GstRtspServer.RTSPAuth:
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, ROLE)
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    return auth


def make_permissions() -> GstRtspServer.RTSPPermissions:
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_permission_for_role(ROLE, GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
    permissions.add_permission_for_role(ROLE, GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
    return permissions


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Gst.init(None)

    server = GstRtspServer.RTSPServer()
    server.set_address(args.address)
    server.set_service(str(args.port))
    # The default listen backlog is 5: fifty readers connecting at once (the fleet tests) would wait
    # out TCP's SYN retransmission back-off if the main loop is slow to accept.
    server.set_backlog(128)
    # GStreamer serves every client from ONE thread by default (max-threads 1): a client whose request
    # blocks (a shared media preparing, a write to a full TCP window) then stalls all the others. A
    # camera answers its clients independently: a thread per client, up to 64.
    server.get_thread_pool().set_max_threads(64)
    if args.user is not None:
        server.set_auth(make_auth(args.user, args.password))

    mount_points = server.get_mount_points()
    line = launch_line(args)
    stamped = StampedFrames(args.width, args.height, args.fps) if args.counter else None

    def on_media_configure(_factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        assert stamped is not None
        stamped.attach(media.get_element().get_by_name(STAMP_SOURCE))

    for mount in (m.strip() for m in args.mounts.split(",")):
        if not mount:
            continue
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(line)
        factory.set_shared(args.shared)
        if stamped is not None:
            factory.connect("media-configure", on_media_configure)
        if args.user is not None:
            factory.set_permissions(make_permissions())
        mount_points.add_factory(f"/{mount}", factory)

    loop = GLib.MainLoop()

    def on_signal() -> bool:
        loop.quit()
        return False  # GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, on_signal)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, on_signal)

    # Drop sessions of clients that vanished without TEARDOWN (e.g. a killed FFmpeg).
    pool = server.get_session_pool()

    def cleanup_sessions() -> bool:
        pool.cleanup()
        return True  # GLib.SOURCE_CONTINUE

    GLib.timeout_add_seconds(2, cleanup_sessions)

    if server.attach(None) == 0:
        print(f"ERROR: cannot bind {args.address}:{args.port}", file=sys.stderr, flush=True)
        return 1
    keepers = []
    if args.shared:
        # GStreamer RTSP server 1.22 aborts (gst_rtsp_media_get_rates: assertion failed) when a client
        # joins a shared media while its last client leaves and it unprepares. One in-process client
        # per mount keeps each shared media prepared, so clients coming and going never race that.
        creds = f" user-id={args.user} user-pw={args.password}" if args.user is not None else ""
        host = "127.0.0.1" if args.address in ("0.0.0.0", "::") else args.address
        for mount in (m.strip() for m in args.mounts.split(",") if m.strip()):
            keeper = Gst.parse_launch(
                f"rtspsrc location=rtsp://{host}:{args.port}/{mount} protocols=tcp latency=0{creds} "
                "! fakesink sync=false async=false"
            )
            keeper.set_state(Gst.State.PLAYING)
            keepers.append(keeper)
    stamp = " with a wall-clock stamp" if args.counter else ""
    print(f"camsim: {args.codec} {args.width}x{args.height}@{args.fps}{stamp} on port {args.port}", flush=True)
    print("READY", flush=True)
    loop.run()
    for keeper in keepers:
        keeper.set_state(Gst.State.NULL)
    print("camsim: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
