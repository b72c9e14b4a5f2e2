"""edge-agent: records IP cameras on MQTT command and ships the MP4s to MinIO/S3 or local disk."""

__version__ = "0.1.0"
