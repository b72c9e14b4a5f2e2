# Stands in for eclipse-mosquitto:2 in tests/test_docker.py's compose test (deploy/docker/compose.yaml):
# the test machines reach no image registry, so the real image cannot be pulled. Built from the tests'
# local bookworm base image (tests/parts/docker.py, --build-arg BASE_IMAGE).
#
# As the real image: the broker's user and group `mosquitto` with uid/gid 1883 (the README's
# `chown 1883:1883 passwd`), /mosquitto/{config,data,log} owned by it, data and log as volumes, port
# 1883, `mosquitto -c /mosquitto/config/mosquitto.conf` started as root, which drops to that user
# itself; mosquitto_sub/mosquitto_pub/mosquitto_passwd in the image (compose.yaml's health check).
# Unlike it: Debian 12's Mosquitto 2.0.11 on glibc (the real image: the newest 2.0.x on Alpine), no
# default config in /mosquitto/config (compose.yaml mounts its own), and no entry point script (the
# real one only chowns /mosquitto, which the read-only mounts refuse anyway).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# The user first, with the real image's ids: the package's postinst then keeps it (adduser --system
# accepts an existing system user).
RUN groupadd --system --gid 1883 mosquitto \
 && useradd --system --uid 1883 --gid 1883 --home-dir /var/lib/mosquitto --no-create-home \
      --shell /usr/sbin/nologin mosquitto \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o mosquitto -g mosquitto -m 0755 /mosquitto /mosquitto/config /mosquitto/data /mosquitto/log \
 && test "$(id -u mosquitto):$(id -g mosquitto)" = 1883:1883
VOLUME ["/mosquitto/data", "/mosquitto/log"]
EXPOSE 1883
CMD ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
