"""The container users run: deploy/docker/Dockerfile built and run against the real test parts.

The image is made once per session in the background (tests/parts/docker.py, started by
tests/conftest.py after collection; these tests run last and wait for it): dockerd if none runs, a
``debian:bookworm-slim`` equivalent from Debian's packages (no registry is reachable), the build with
the host's extra CA certificates as a build secret. The container runs with ``--network host`` so it
reaches the test broker, S3 server and camera simulator on 127.0.0.1.

deploy/docker/compose.yaml is run as users run it (``docker compose up -d``, Compose v2 from
scripts/install-compose.sh) with that image as the agent and local stand-ins for the Mosquitto and
MinIO images (tests/docker/: no registry to pull them from), against a camera simulator on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from faultproxy import LOCALHOST, FaultProxy
from minio import Minio
from parts import (
    ROOT,
    CameraSim,
    Mosquitto,
    MqttProbe,
    SeaweedS3,
    ffprobe_info,
    free_port,
    moov_before_mdat,
    write_config,
)
from parts.docker import (
    EXTRA_CA_DIR,
    ComposeProject,
    Container,
    DockerPrep,
    compose_plugin_missing,
    docker,
    extra_ca_bundle,
)
from rig import download, minio_storage, mosquitto_pub

pytestmark = [pytest.mark.integration, pytest.mark.serial]

DEVICE = "edge-docker"
IMAGE_CONFIG = "/etc/edge-agent/agent.yaml"
STATE_DIR = "/var/lib/edge-agent"
AGENT_UID = "10001"


@pytest.fixture(scope="session")
def image(docker_prep: DockerPrep) -> str:
    tag = docker_prep.wait()
    print(f"\nDocker preparation timings: {json.dumps(docker_prep.timings)}")
    return tag


@pytest.fixture
def volume(image: str) -> Iterator[str]:
    """A named volume for the state directory (the image prepares it, as for users), removed after."""
    name = f"edge-agent-test-{uuid.uuid4().hex[:10]}"
    docker("volume", "create", name)
    try:
        yield name
    finally:
        docker("volume", "rm", "--force", name, check=False)


def decodes_cleanly(path: Path) -> None:
    """Every frame decodes without an error (a playable file, not only a parsable one)."""
    done = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-f", "null", "-"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-2000:]


def check_mp4(path: Path, final: dict[str, Any], min_seconds: float) -> dict[str, Any]:
    info = ffprobe_info(path)
    assert info["codec"] == "h264" and info["duration"] >= min_seconds, info
    assert moov_before_mdat(path)
    decodes_cleanly(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final["sha256"]
    return info


@pytest.mark.timeout(1200)  # the first Docker test waits for the image (built in the background)
def test_check_config_works_as_the_readme_says(tmp_path: Path, image: str) -> None:
    """`docker run --rm -v agent.yaml:/etc/edge-agent/agent.yaml:ro IMAGE check-config`, and a bad file."""
    good = write_config(tmp_path / "agent.yaml", device_id=DEVICE, mqtt_port=1883, topic_prefix="edge",
                        cameras={"cam1": {"url": "rtsp://192.0.2.10/stream1"}}, output_dir=Path(STATE_DIR),
                        storage={"type": "local"})  # fmt: skip
    done = docker("run", "--rm", "-v", f"{good}:{IMAGE_CONFIG}:ro", image, "check-config", check=False)
    assert done.returncode == 0, done
    assert f"{IMAGE_CONFIG}: OK (device {DEVICE}, 1 camera(s), storage local)" in done.stdout
    assert "warning" not in done.stderr  # FFmpeg is found in the image

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("max_seconds: 3600", "max_seconds: -5", 1))
    done = docker("run", "--rm", "-v", f"{bad}:{IMAGE_CONFIG}:ro", image, "check-config", check=False)
    assert done.returncode == 2 and "max_seconds" in done.stderr, done
    # The image's other entry points: --version, and any command.
    assert docker("run", "--rm", image, "--version").stdout.startswith("edge-agent ")
    assert docker("run", "--rm", image, "id", "-u").stdout.strip() == AGENT_UID


@pytest.mark.timeout(1200)
def test_the_image_ffmpeg_is_headless_and_the_image_small(image: str, docker_prep: DockerPrep) -> None:
    """The image's FFmpeg (compiled in the Dockerfile) links no display, audio or GPU library, and can
    do what the agent asks of it; the image stays far below the 661 MB of Debian's FFmpeg packages."""
    libs = docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                  "ldd /usr/local/bin/ffmpeg /usr/local/bin/ffprobe").stdout  # fmt: skip
    for unwanted in ("libX11", "libxcb", "libSDL", "libva", "libvdpau", "libvulkan", "libasound", "libpulse",
                     "libavdevice", "libavcodec.so"):  # fmt: skip
        assert unwanted not in libs, libs
    caps = docker("run", "--rm", "--entrypoint", "sh", image, "-c",
                  "ffmpeg -hide_banner -protocols; ffmpeg -hide_banner -muxers; ffmpeg -hide_banner -encoders; "
                  "ffmpeg -hide_banner -decoders; ffmpeg -hide_banner -demuxers").stdout  # fmt: skip
    for needed in (" rtp", " tcp", " tls", " segment", " mp4", " libx264", " mjpeg", " h264", " hevc", " rtsp"):
        assert needed in caps, needed
    size = docker("image", "inspect", "--format", "{{.Size}}", image).stdout.strip()
    assert int(size) < 350e6, f"image {int(size) / 1e6:.0f} MB (timings: {docker_prep.timings})"


@pytest.mark.timeout(1200)
def test_extra_ca_certificates_stay_out_of_the_image(tmp_path: Path, image: str) -> None:
    """The build got the host's extra CA certificates as a secret (pip needed them here); none is shipped."""
    bundle = extra_ca_bundle(tmp_path)
    if bundle is None:
        pytest.skip(f"no extra CA certificates in {EXTRA_CA_DIR} on this machine")
    lines = [line for line in bundle.read_text().splitlines() if line and "CERTIFICATE" not in line]
    needle = lines[len(lines) // 2]  # a line of base64 from inside the first certificate
    found = docker("run", "--rm", "--user", "0", "--entrypoint", "grep", image, "-rlsF", needle,
                   "/etc", "/opt", "/usr/local", "/usr/share/ca-certificates", "/usr/lib/ssl", "/root", "/tmp",
                   "/var", check=False)  # fmt: skip
    assert found.returncode != 0 and not found.stdout.strip(), found  # 1: not found (2: a folder is absent)


@pytest.mark.timeout(1200)
def test_container_records_uploads_and_finalises_on_docker_stop(
    tmp_path: Path, image: str, volume: str, broker: Mosquitto, probe: MqttProbe, prefix: str,
    camera: CameraSim, s3: SeaweedS3, bucket: str,
) -> None:  # fmt: skip
    # The agent reaches S3 through a proxy, cut when `docker stop` comes: otherwise the finalised
    # recording could be uploaded in the shutdown window, and the restart would have nothing to do.
    proxy = FaultProxy((LOCALHOST, s3.port), name="s3-link").start()
    storage = minio_storage(s3, bucket, endpoint=proxy.endpoint, min_free_bytes=0, retry_initial_seconds=0.5,
                            retry_max_seconds=2)  # fmt: skip
    config = write_config(
        tmp_path / "agent.yaml", device_id=DEVICE, mqtt_port=broker.port, topic_prefix=prefix,
        cameras={"cam1": {"url": camera.url("cam1")}}, output_dir=Path(STATE_DIR) / "recordings", storage=storage,
        recording={"segment_seconds": 2, "first_frame_timeout_seconds": 15, "stop_timeout_seconds": 8},
    )  # fmt: skip
    base = f"{prefix}/{DEVICE}"
    probe.subscribe(f"{prefix}/#")
    container = Container(image, tmp_path, run_args=[
        "--network", "host", "-v", f"{config}:{IMAGE_CONFIG}:ro", "-v", f"{volume}:{STATE_DIR}",
        # The image's own HEALTHCHECK command, checked every second instead of every 30 s.
        "--health-interval", "1s", "--health-retries", "2", "--health-start-period", "0s",
    ])  # fmt: skip
    timings: dict[str, float] = {}

    def wait_online(what: str) -> None:
        began = time.monotonic()
        try:
            probe.wait_for_raw(f"{base}/status", lambda p: p == b"online", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{what}: the agent did not come online\n{container.log_excerpt()}") from exc
        timings[what] = round(time.monotonic() - began, 1)

    def task_status(task: str, wanted: set[str], timeout: float) -> dict[str, Any]:
        try:
            return probe.wait_for(f"{base}/cam1/tasks/{task}", lambda p: p["status"] in wanted, timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"task {task} never {wanted}\n{container.log_excerpt()}") from exc

    def record(task: str, seconds: float) -> None:
        mosquitto_pub(broker.port, f"{base}/cam1/cmd", json.dumps({"action": "start", "task_name": task}))
        task_status(task, {"recording"}, timeout=30)
        time.sleep(seconds)

    try:
        container.run()
        wait_online("start_to_online_s")
        assert container.inspect("{{.Config.User}}") == "edge-agent"

        # 1. start/stop through MQTT ends `uploaded` with a playable MP4.
        record("dock1", 6)
        # Every process in the container, FFmpeg included, runs as the agent's user.
        uids = container.exec("sh", "-c", "grep -h '^Uid:' /proc/[0-9]*/status; ls /proc/*/exe -l 2>/dev/null")
        assert uids.returncode == 0, uids
        lines = [line.split() for line in uids.stdout.splitlines() if line.startswith("Uid:")]
        assert len(lines) >= 3 and all(set(line[1:]) == {AGENT_UID} for line in lines), uids.stdout
        assert "/usr/local/bin/ffmpeg" in uids.stdout, uids.stdout
        mosquitto_pub(broker.port, f"{base}/cam1/cmd", json.dumps({"action": "stop", "task_name": "dock1"}))
        final = task_status("dock1", {"uploaded", "failed"}, timeout=60)
        assert final["status"] == "uploaded", final
        # The bound of tests/test_e2e_core.py: the MP4 holds the time from `recording` to `stop` within 2 s
        # (its first and last fragments); 1 s more for a container on a loaded machine.
        info = check_mp4(download(final["download_url"], tmp_path / "dock1.mp4"), final, min_seconds=3.0)
        assert info["width"] == camera.width and info["height"] == camera.height
        timings["dock1_mp4_s"] = info["duration"]

        # 2. Docker's health status comes from the agent's own health file.
        container.wait_until(lambda: container.health() == "healthy", 30, "become healthy")
        assert container.exec("edge-agent", "health").returncode == 0

        # 3. `docker stop` during a recording finalises it: the MP4 stays in the volume (S3 cut) ...
        record("dock2", 5)
        proxy.set_cut_after(0.0)
        proxy.cut_all()
        timings["docker_stop_s"] = round(container.stop(grace=60), 1)
        assert container.inspect("{{.State.ExitCode}}") == "0", container.log_excerpt()
        assert timings["docker_stop_s"] < 30, (timings, container.log_excerpt())
        probe.wait_for_raw(f"{base}/status", lambda p: p == b"offline", timeout=10)
        pending = probe.messages(f"{base}/cam1/tasks/dock2")[-1]
        assert pending["status"] in ("uploading", "upload_pending"), pending
        assert "shutdown" in pending["stop_reason"], pending
        mountpoint = Path(docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())
        in_volume = mountpoint / Path(pending["local_file"]).relative_to(STATE_DIR)
        assert in_volume.is_file(), (pending, sorted(str(p) for p in mountpoint.rglob("*")))
        timings["dock2_in_volume_mp4_s"] = check_mp4(in_volume, pending, min_seconds=2.5)["duration"]

        # ... and it is uploaded after the next container start.
        proxy.set_cut_after(None)
        probe.clear()
        container.start()
        wait_online("restart_to_online_s")
        final2 = task_status("dock2", {"uploaded", "failed"}, timeout=60)
        assert final2["status"] == "uploaded", final2
        check_mp4(download(final2["download_url"], tmp_path / "dock2.mp4"), final2, min_seconds=2.5)
        assert not in_volume.exists()  # delete_local_after_upload

        # 4. A lost broker makes the container unhealthy (the process still runs).
        container.wait_until(lambda: container.health() == "healthy", 30, "become healthy again")
        broker.stop()
        container.wait_until(lambda: container.health() == "unhealthy", 30, "turn unhealthy without its broker")
        assert "not connected to the MQTT broker" in container.health_log()
        assert container.inspect("{{.State.Running}}") == "true"
        print(f"\ncontainer timings: {json.dumps(timings)}")
    finally:
        container.remove()
        proxy.stop()


# The compose test's throwaway secrets (never used outside this test's containers).
COMPOSE_DEVICE = "edge-01"  # deploy/docker/agent.yaml's device_id and broker user
COMPOSE_PASSWORDS = {COMPOSE_DEVICE: "edge-01-test-pw", "controller": "controller-test-pw"}
MINIO_USER, MINIO_PASSWORD = "edgeagent", "minio-test-pw"
MOSQUITTO_UID = 1883  # the user of the eclipse-mosquitto image (and of its stand-in)


def mosquitto_sub_says(port: int, *login: str) -> str:
    """What Mosquitto's own client says when it subscribes with ``login`` (``-u USER -P PW``) or none."""
    done = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), *login, "-t", "#", "-C", "1",
                           "-W", "5"], capture_output=True, text=True, timeout=20)  # fmt: skip
    return f"exit {done.returncode}: {done.stdout}{done.stderr}".strip()


@pytest.fixture
def compose_v2() -> None:
    """Fails (never skips) when `docker compose` is missing, before waiting for the images."""
    missing = compose_plugin_missing()
    if missing is not None:
        pytest.fail(missing)


@pytest.mark.timeout(1200)
def test_compose_file_records_and_uploads_as_the_readme_says(
    compose_v2: None, tmp_path: Path, docker_prep: DockerPrep, image: str, track: Any
) -> None:
    """deploy/docker/compose.yaml under Compose v2 with the README's steps: `docker compose up -d`, the
    agent comes online on the compose broker, a start/stop from the `controller` user ends `uploaded`
    with a playable MP4 in the compose S3 server, the broker refuses anonymous clients, `down -v`
    leaves nothing. Mosquitto and MinIO are local stand-ins (tests/docker/); the camera is on the host."""
    # The deploy folder as users have it (compose.yaml mounts ../mosquitto/acl), plus what they make.
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy, ignore=shutil.ignore_patterns("passwd"))
    workdir = deploy / "docker"
    passwd = workdir / "passwd"
    for n, (user, password) in enumerate(COMPOSE_PASSWORDS.items()):
        create = ["-c"] if n == 0 else []
        subprocess.run(["mosquitto_passwd", *create, "-b", str(passwd), user, password], check=True, timeout=10,
                       capture_output=True)  # fmt: skip
    if os.geteuid() == 0:  # as the README says: only the image's mosquitto user reads it
        os.chown(passwd, MOSQUITTO_UID, MOSQUITTO_UID)
        passwd.chmod(0o600)
    else:  # the docker group but not root: no chown, so readable by everyone (a throwaway file)
        passwd.chmod(0o644)
    # The camera simulator listens on every interface of the host; the agent reaches it through the
    # host's address on the Docker bridge (Docker's host-gateway), a test-only override.
    camera = track(CameraSim(tmp_path / "camsim", mounts=("cam1",), width=640, height=360, address="0.0.0.0"))
    camera.start()
    (workdir / "test-override.yaml").write_text(
        "services:\n  agent:\n    extra_hosts:\n      - \"host.docker.internal:host-gateway\"\n"
    )
    mqtt_port, minio_port, console_port = free_port(), free_port(), free_port()
    project = ComposeProject(workdir, ["compose.yaml", "test-override.yaml"], env={
        "MOSQUITTO_IMAGE": docker_prep.mosquitto_tag, "MINIO_IMAGE": docker_prep.minio_tag,
        "EDGE_AGENT_IMAGE": image,
        "MQTT_PORT": str(mqtt_port), "MINIO_PORT": str(minio_port), "MINIO_CONSOLE_PORT": str(console_port),
        "MINIO_ROOT_USER": MINIO_USER, "MINIO_ROOT_PASSWORD": MINIO_PASSWORD,
        "EDGE_AGENT_MQTT_PASSWORD": COMPOSE_PASSWORDS[COMPOSE_DEVICE],
        "EDGE_AGENT_CAMERA_CAM1_URL": camera.url("cam1", host="host.docker.internal"),
    })  # fmt: skip
    base = f"edge/{COMPOSE_DEVICE}"  # agent.yaml: topic_prefix edge
    timings: dict[str, float] = {}
    probe: MqttProbe | None = None
    try:
        began = time.monotonic()
        # No build and no pull: every image is local (the agent's is the one the other tests built).
        project.run("up", "-d", "--no-build", "--pull", "never", timeout=180)
        timings["up_to_healthy_s"] = round(time.monotonic() - began, 1)  # returns once the broker is healthy
        states = project.run("ps", "--format", "{{.Service}} {{.State}} {{.Health}}", timeout=30).stdout
        assert "mosquitto running healthy" in states, states

        began = time.monotonic()
        probe = MqttProbe("127.0.0.1", mqtt_port, username="controller", password=COMPOSE_PASSWORDS["controller"])
        probe.subscribe(f"{base}/#")
        probe.wait_for_raw(f"{base}/status", lambda p: p == b"online", timeout=60)
        timings["up_to_online_s"] = round(timings["up_to_healthy_s"] + time.monotonic() - began, 1)

        # The broker dropped root for the image's mosquitto user, which reads the passwd chowned to it.
        status = project.run("exec", "-T", "mosquitto", "grep", "^Uid:", "/proc/1/status", timeout=30).stdout
        assert status.split()[1:] == [str(MOSQUITTO_UID)] * 4, status
        # The broker's security claim: no anonymous clients, nor a wrong password.
        for login in ((), ("-u", "controller", "-P", "not-the-password")):
            said = mosquitto_sub_says(mqtt_port, *login)
            assert "not authorised" in said and not said.startswith("exit 0"), (login, said)

        began = time.monotonic()
        probe.publish(f"{base}/cam1/cmd", {"action": "start", "task_name": "compose1"})
        probe.wait_for(f"{base}/cam1/tasks/compose1", lambda p: p["status"] == "recording", timeout=30)
        time.sleep(5)
        probe.publish(f"{base}/cam1/cmd", {"action": "stop", "task_name": "compose1"})
        final = probe.wait_for(f"{base}/cam1/tasks/compose1", lambda p: p["status"] in ("uploaded", "failed"),
                               timeout=60)  # fmt: skip
        timings["start_to_uploaded_s"] = round(time.monotonic() - began, 1)
        assert final["status"] == "uploaded" and final["bucket"] == "recordings", final

        # The object through the published S3 port, with the MinIO root credentials.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=30), retries=urllib3.Retry(total=2))
        s3 = Minio(f"127.0.0.1:{minio_port}", access_key=MINIO_USER, secret_key=MINIO_PASSWORD, secure=False,
                   region="us-east-1", http_client=http)  # fmt: skip
        mp4 = tmp_path / "compose1.mp4"
        s3.fget_object(final["bucket"], final["object_name"], str(mp4))
        info = check_mp4(mp4, final, min_seconds=3.0)
        assert (info["width"], info["height"]) == (camera.width, camera.height), info
        timings["mp4_s"] = info["duration"]
    except BaseException:
        print(project.logs())
        raise
    finally:
        if probe is not None:
            probe.close()
        began = time.monotonic()
        down = project.down()
        timings["down_s"] = round(time.monotonic() - began, 1)
        print(f"\ncompose timings: {json.dumps(timings)}")
    assert not isinstance(down, Exception), down
    assert project.containers() == [] and project.volumes() == []
