"""The agent's own exceptions, so callers never catch a library's.

    EdgeAgentError
    ├── ConfigError          agent.yaml is invalid (names every bad key)
    ├── CommandError         a command payload is rejected (reply status "rejected")
    ├── FFmpegNotFound       the configured ffmpeg/ffprobe cannot be run
    ├── RecordingError       FFmpeg failed or produced nothing usable
    └── UploadError
        ├── TransientUploadError   network, timeouts, 5xx: retry with backoff
        └── PermanentUploadError   denied, bad bucket, unreadable file: fail the task
"""


class EdgeAgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """The configuration file is missing, unreadable or invalid."""


class CommandError(EdgeAgentError):
    """A command payload that cannot be executed; the message is sent back to the caller."""


class FFmpegNotFound(EdgeAgentError):
    """The configured FFmpeg or ffprobe executable does not exist or is not executable."""


class RecordingError(EdgeAgentError):
    """FFmpeg failed, delivered no media, or left no playable output."""


class UploadError(EdgeAgentError):
    """An upload attempt failed."""


class TransientUploadError(UploadError):
    """Worth retrying: the network, a timeout, a 5xx or throttling answer."""


class PermanentUploadError(UploadError):
    """Retrying cannot help: credentials, permissions, an unusable bucket, an unreadable file."""
