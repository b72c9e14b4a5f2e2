"""Docker for tests/test_docker.py: the engine, a locally made base image, the image, containers.

- ``DockerEngine``: Debian's ``dockerd``, started by the tests only when no engine answers, stopped
  by its pid afterwards.
- The base image: no image registry is reachable, so a ``debian:bookworm-slim`` equivalent is made
  from Debian's packages (``mmdebstrap --variant=minbase``, merged /usr, documentation excluded as in
  the official slim image, no ca-certificates either: 88 packages, about 78 MB) and ``docker
  import``-ed under a unique tag, which the build gets as ``--build-arg BASE_IMAGE`` (the Dockerfile's
  default is the pullable ``debian:bookworm-slim``).
- ``DockerPrep``: engine + base image + ``docker build`` of deploy/docker/Dockerfile, then the compose
  test's stand-ins for the Mosquitto and MinIO images (tests/docker/*.Dockerfile, from the same base:
  the real images cannot be pulled here), in a background thread started right after collection
  (tests/conftest.py), so the ~2-3 minutes overlap the rest of the suite; the Docker tests run last
  and only wait for it. ``cleanup()`` removes what it made.
- ``Container``: ``docker run -d`` with bounded waits that fail with the container's log.
- ``ComposeProject``: ``docker compose`` (v2, the CLI plugin installed by scripts/install-compose.sh)
  on one project name, with bounded commands.

The client is Debian's ``/usr/bin/docker`` (docker.io 20.10): its built-in BuildKit (DOCKER_BUILDKIT=1)
builds the Dockerfile's ``RUN --mount=type=secret``; a newer client without the buildx plugin cannot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from parts.base import ROOT, ManagedProcess, PartError, tail
from parts.s3 import weed_binary

DOCKER = "/usr/bin/docker"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
STAND_INS = ROOT / "tests" / "docker"  # Dockerfiles of the compose test's Mosquitto and MinIO stand-ins
COMPOSE_PLUGIN = Path("/usr/local/lib/docker/cli-plugins/docker-compose")
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
DEBIAN_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# As debuerreotype's --slim (the official bookworm-slim): no docs, man pages or translations.
SLIM_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*", "path-exclude=/usr/share/linda/*",
)  # fmt: skip
MERGED_USR_HOOK = "/usr/share/mmdebstrap/hooks/merged-usr"
PREP_TIMEOUT = 900.0  # engine + base image + build, on a loaded 2-core machine


def docker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DOCKER_BUILDKIT"] = "1"
    env.pop("DOCKER_HOST", None)  # the engine these tests start listens on the default socket
    return env


def docker(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs the Docker client; a non-zero exit (with ``check``) raises PartError with its output."""
    cmd = [DOCKER, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=docker_env(), check=False)
    except subprocess.TimeoutExpired as exc:
        raise PartError(f"{' '.join(cmd)}: no answer within {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        raise PartError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done


def engine_answers() -> bool:
    try:
        return docker("version", "--format", "{{.Server.Version}}", timeout=15, check=False).returncode == 0
    except PartError:
        return False


class DockerEngine(ManagedProcess):
    """``dockerd`` with its defaults (overlay2, /var/lib/docker, the default socket)."""

    name = "dockerd"
    start_timeout = 60.0
    stop_timeout = 30.0

    def command(self) -> list[str]:
        return ["dockerd"]

    def is_ready(self) -> bool:
        return engine_answers()


def extra_ca_bundle(workdir: Path) -> Path | None:
    """The host's extra CA certificates in one PEM file (the build's ``extra-ca`` secret), or None."""
    certs = sorted(EXTRA_CA_DIR.glob("*.crt")) if EXTRA_CA_DIR.is_dir() else []
    if not certs:
        return None
    bundle = workdir / "extra-ca.pem"
    bundle.write_text("".join(c.read_text() for c in certs))
    return bundle


class DockerPrep:
    """Engine, base image and image, made in a background thread; ``wait()`` returns the image tag."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "docker-prep.log"
        suffix = uuid.uuid4().hex[:10]
        self.base_tag = os.environ.get("EDGE_DOCKER_BASE_IMAGE") or f"edge-agent-test-base:{suffix}"
        self.make_base = "EDGE_DOCKER_BASE_IMAGE" not in os.environ
        self.image_tag = f"edge-agent-test:{suffix}"
        # Stand-ins for eclipse-mosquitto:2 and minio/minio (tests/docker/), for the compose test.
        self.mosquitto_tag = f"edge-agent-test-mosquitto:{suffix}"
        self.minio_tag = f"edge-agent-test-minio:{suffix}"
        self.engine: DockerEngine | None = None  # set only when this session started dockerd
        self.timings: dict[str, float] = {}
        self.error: BaseException | None = None
        self.skip_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name="docker-prep", daemon=True)
        self._made: list[str] = []

    def start(self) -> DockerPrep:
        self._thread.start()
        return self

    def wait(self, timeout: float = PREP_TIMEOUT) -> str:
        started = time.monotonic()
        self._thread.join(timeout)
        self.timings["waited_s"] = round(time.monotonic() - started, 1)
        if self._thread.is_alive():
            raise PartError(f"Docker preparation not done within {timeout:.0f} s\n{self.log_excerpt()}")
        if self.error is not None:
            raise PartError(f"Docker preparation failed: {self.error}\n{self.log_excerpt()}") from self.error
        return self.image_tag

    def log_excerpt(self, lines: int = 60) -> str:
        return f"--- last {lines} lines of {self.log_path} ---\n{tail(self.log_path, lines)}\n--- end ---"

    # -- the background work
    def _log(self, text: str) -> None:
        with self.log_path.open("a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def _step(self, name: str, cmd: Sequence[str], timeout: float) -> None:
        self._log(f"=== {name}: {' '.join(cmd)}")
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            try:
                proc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=docker_env(),
                                      timeout=timeout, check=False, cwd=ROOT)  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise PartError(f"{name} did not finish within {timeout:.0f} s") from exc
        self.timings[f"{name}_s"] = round(time.monotonic() - began, 1)
        if proc.returncode != 0:
            raise PartError(f"{name} exited {proc.returncode}")

    def _run(self) -> None:
        try:
            began = time.monotonic()
            self._ensure_engine()
            if self.make_base:
                self._make_base_image()
            self._build()
            self._build_stand_ins()
            self.timings["prep_total_s"] = round(time.monotonic() - began, 1)
            self._log(f"=== timings: {json.dumps(self.timings)}")
        except BaseException as exc:
            self.error = exc
            self._log(f"=== failed: {exc!r}")

    def _ensure_engine(self) -> None:
        if not Path(DOCKER).exists() or shutil.which("dockerd") is None:
            raise PartError(f"{DOCKER} or dockerd missing: run scripts/install-deps.sh (Debian docker.io)")
        if engine_answers():
            self._log("=== a Docker engine already answers: using it")
            return
        began = time.monotonic()
        self.engine = DockerEngine(self.workdir)
        self.engine.start()
        self.timings["dockerd_start_s"] = round(time.monotonic() - began, 1)

    def _make_base_image(self, timeout: float = 600.0) -> None:
        if shutil.which("mmdebstrap") is None:
            raise PartError("mmdebstrap missing: run scripts/install-deps.sh")
        # merged /usr set up by mmdebstrap's hook, as in the official image: without it mmdebstrap
        # installs the usrmerge package, which brings Perl (about 50 MB that the real slim image lacks).
        strap = ["mmdebstrap", "--quiet", "--variant=minbase", f"--hook-dir={MERGED_USR_HOOK}",
                 *[f"--dpkgopt={o}" for o in SLIM_DPKG_OPTS], "bookworm", "-", *DEBIAN_MIRRORS]  # fmt: skip
        load = [DOCKER, "import", "-", self.base_tag]
        self._log(f"=== base_image: {' '.join(strap)} | {' '.join(load)}")
        self._made.append(self.base_tag)
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            # The root file system goes as a tar from mmdebstrap's stdout straight into `docker import`.
            maker = subprocess.Popen(strap, stdout=subprocess.PIPE, stderr=log, cwd=self.workdir)
            assert maker.stdout is not None
            try:
                loaded = subprocess.run(load, stdin=maker.stdout, stdout=log, stderr=subprocess.STDOUT,
                                        env=docker_env(), timeout=timeout, check=False)  # fmt: skip
                maker.stdout.close()
                made = maker.wait(timeout=60)
            except subprocess.TimeoutExpired as exc:
                maker.kill()
                maker.wait()
                raise PartError(f"base image not made within {timeout:.0f} s") from exc
        self.timings["base_image_s"] = round(time.monotonic() - began, 1)
        if made != 0 or loaded.returncode != 0:
            raise PartError(f"base image: mmdebstrap exited {made}, docker import exited {loaded.returncode}")

    def _build(self) -> None:
        cmd = [DOCKER, "build", "--progress=plain", "-f", str(DOCKERFILE), "-t", self.image_tag,
               "--build-arg", f"BASE_IMAGE={self.base_tag}"]  # fmt: skip
        bundle = extra_ca_bundle(self.workdir)
        if bundle is not None:
            cmd += ["--secret", f"id=extra-ca,src={bundle}"]
        self._made.append(self.image_tag)
        self._step("build", [*cmd, str(ROOT)], timeout=PREP_TIMEOUT)
        for name, tag in (("image_mb", self.image_tag), ("base_image_mb", self.base_tag)):
            size = docker("image", "inspect", "--format", "{{.Size}}", tag, check=False).stdout.strip()
            if size.isdigit():
                self.timings[name] = round(int(size) / 1e6)

    def _build_stand_ins(self) -> None:
        """The Mosquitto and MinIO stand-ins (tests/docker/) from the same base image."""
        def build(name: str, tag: str, dockerfile: str, context: Path) -> None:
            self._made.append(tag)
            self._step(name, [DOCKER, "build", "--progress=plain", "-f", str(STAND_INS / dockerfile), "-t", tag,
                              "--build-arg", f"BASE_IMAGE={self.base_tag}", str(context)], timeout=300)  # fmt: skip

        build("mosquitto_image", self.mosquitto_tag, "mosquitto.Dockerfile", STAND_INS)
        # The MinIO stand-in's build context: SeaweedFS's `weed` (the venv's, ~150 MB: linked when on
        # the same file system) and the entry point.
        context = self.workdir / "minio-context"
        shutil.rmtree(context, ignore_errors=True)
        context.mkdir()
        weed = Path(weed_binary()).resolve()
        try:
            os.link(weed, context / "weed")
        except OSError:
            shutil.copy2(weed, context / "weed")
        shutil.copy2(STAND_INS / "minio-entrypoint.sh", context / "minio-entrypoint.sh")
        try:
            build("minio_image", self.minio_tag, "minio.Dockerfile", context)
        finally:
            shutil.rmtree(context, ignore_errors=True)

    # -- teardown
    def cleanup(self) -> None:
        """Removes the image and base image made here, then stops dockerd if this session started it."""
        self._thread.join(PREP_TIMEOUT if self._thread.is_alive() else 0)
        if engine_answers():
            for tag in reversed(self._made):
                with contextlib.suppress(PartError):
                    docker("rmi", "--force", tag, timeout=60, check=False)
        if self.engine is not None:
            self.engine.stop()


class Container:
    """One ``docker run -d`` container (unique name), with bounded waits that report its log."""

    def __init__(self, image: str, workdir: Path, run_args: Sequence[str] = (), command: Sequence[str] = ()) -> None:
        self.image = image
        self.name = f"edge-agent-test-{uuid.uuid4().hex[:10]}"
        self.run_args = list(run_args)
        self.command = list(command)
        self.log_path = Path(workdir) / f"{self.name}.log"
        self.created = False

    def run(self) -> Container:
        docker("run", "-d", "--name", self.name, *self.run_args, self.image, *self.command, timeout=60)
        self.created = True
        return self

    def start(self) -> Container:
        docker("start", self.name, timeout=60)
        return self

    def stop(self, grace: int = 60) -> float:
        """``docker stop -t grace``; returns the seconds it took."""
        began = time.monotonic()
        docker("stop", "-t", str(grace), self.name, timeout=grace + 30)
        return time.monotonic() - began

    def inspect(self, template: str) -> str:
        return docker("inspect", "--format", template, self.name, timeout=30).stdout.strip()

    def exec(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *cmd, timeout=timeout, check=False)

    def logs(self) -> str:
        done = docker("logs", self.name, timeout=30, check=False)
        text = done.stdout + done.stderr
        with contextlib.suppress(OSError):
            self.log_path.write_text(text)
        return text

    def log_excerpt(self, lines: int = 60) -> str:
        text = "\n".join(self.logs().splitlines()[-lines:])
        return f"--- last {lines} lines of `docker logs {self.name}` ---\n{text}\n--- end ---"

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                state = self.inspect("{{.State.Status}} exit={{.State.ExitCode}}")
                raise AssertionError(f"container {self.name} ({state}) did not {what} within {timeout:.0f} s\n"
                                     f"{self.log_excerpt()}")  # fmt: skip
            time.sleep(0.2)

    def health(self) -> str:
        return self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}}")

    def health_log(self) -> str:
        return self.inspect("{{json .State.Health}}")

    def remove(self) -> None:
        if self.created:
            self.logs()  # kept for the failure report
            docker("rm", "--force", "--volumes", self.name, timeout=60, check=False)
            self.created = False


def compose_plugin_missing() -> str | None:
    """None when ``docker compose`` (Compose v2) answers, else why not and how to install it."""
    try:
        done = docker("compose", "version", timeout=30, check=False)
    except PartError as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()[:1]  # the rest is `docker --help`
    return (f"`{DOCKER} compose` (Docker Compose v2, the CLI plugin {COMPOSE_PLUGIN}) does not work "
            f"(exit {done.returncode}: {' '.join(said)}): install it with scripts/install-compose.sh "
            "(run by scripts/install-deps.sh; amd64 only)")  # fmt: skip


class ComposeProject:
    """``docker compose -p NAME -f FILE...`` run in ``directory`` with ``env`` added to the environment."""

    def __init__(self, directory: Path, files: Sequence[str], env: dict[str, str], name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name or f"edge-agent-test-{uuid.uuid4().hex[:10]}"
        self.files = list(files)
        self.env = {**docker_env(), **env}

    def run(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [DOCKER, "compose", "-p", self.name, *[a for f in self.files for a in ("-f", f)], *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env,
                                  cwd=self.directory, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise PartError(f"{' '.join(cmd)}: not done within {timeout:.0f} s") from exc
        if check and done.returncode != 0:
            raise PartError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done

    def logs(self, lines: int = 60) -> str:
        """The last ``lines`` lines of every service's log (``docker compose logs --tail``)."""
        try:
            done = self.run("logs", "--no-color", "--tail", str(lines), timeout=30, check=False)
        except PartError as exc:
            return str(exc)
        return f"--- docker compose -p {self.name} logs --tail {lines} ---\n{done.stdout}{done.stderr}--- end ---"

    def containers(self) -> list[str]:
        """Every container of the project, running or not (by Compose's project label)."""
        done = docker("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={self.name}", timeout=30)
        return done.stdout.split()

    def volumes(self) -> list[str]:
        done = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.name}", timeout=30)
        return done.stdout.split()

    def down(self, timeout: float = 120.0) -> subprocess.CompletedProcess[str] | PartError:
        """``down -v`` (containers, network, volumes); on failure the containers are removed by force
        so none is left behind, and the failure is returned for the test to report."""
        try:
            return self.run("down", "-v", "--timeout", "60", timeout=timeout, check=True)
        except PartError as exc:
            for container in self.containers():
                docker("rm", "--force", "--volumes", container, timeout=60, check=False)
            return exc
