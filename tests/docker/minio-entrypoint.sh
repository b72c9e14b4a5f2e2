#!/bin/sh
# The MinIO stand-in's entry point (tests/docker/minio.Dockerfile): MinIO's
# `server DIR [--address :9000] [--console-address ADDR]` runs SeaweedFS's single-process S3 server on
# DIR, with MINIO_ROOT_USER / MINIO_ROOT_PASSWORD (MinIO's defaults: minioadmin) as its key pair.
# Any other command runs as it is.
set -eu
[ "${1:-}" = server ] || exec "$@"
shift
dir=
s3_port=9000
while [ "$#" -gt 0 ]; do
  case "$1" in
    --console-address) shift 2 ;;            # no console in the stand-in
    --console-address=*) shift ;;
    --address) s3_port=${2##*:}; shift 2 ;;
    --address=*) s3_port=${1##*:}; shift ;;
    -*) echo "minio stand-in: unsupported option $1" >&2; exit 2 ;;
    *) dir=$1; shift ;;
  esac
done
[ -n "$dir" ] || { echo "minio stand-in: usage: server DIR [--address :PORT] [--console-address ADDR]" >&2; exit 2; }
user=${MINIO_ROOT_USER:-minioadmin}
password=${MINIO_ROOT_PASSWORD:-minioadmin}
if [ "${#user}" -lt 3 ] || [ "${#password}" -lt 8 ]; then
  echo "minio stand-in: MINIO_ROOT_USER needs 3+ and MINIO_ROOT_PASSWORD 8+ characters (as MinIO)" >&2
  exit 1
fi
mkdir -p "$dir"
export AWS_ACCESS_KEY_ID="$user" AWS_SECRET_ACCESS_KEY="$password"
# Every port but S3's stays inside the container; the S3 gateway listens on all its interfaces.
exec /usr/local/bin/weed mini -dir="$dir" -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port="$s3_port" \
  -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -master.telemetry=false
