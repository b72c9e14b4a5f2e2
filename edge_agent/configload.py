"""Reading `agent.yaml`: environment overrides and secret files applied, then validated, every bad key named.

Secrets can be kept out of the file: environment variables override them (`ENV_OVERRIDES`,
`EDGE_AGENT_CAMERA_<ID>_URL`) and `*_file` keys name a file holding the value, so a systemd
`EnvironmentFile=` or a Docker secret can carry them. The models themselves are `edge_agent.config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from edge_agent import redact
from edge_agent.config import AgentConfig
from edge_agent.errors import ConfigError


def secret_values(cfg: AgentConfig) -> tuple[str, ...]:
    """Every secret value in the configuration (to be masked wherever it might reappear)."""
    out: list[str] = []
    for cam in cfg.cameras.values():
        out.extend(redact.url_secrets(cam.url.get_secret_value()))
    candidates: list[SecretStr | None] = [cfg.mqtt.password, cfg.storage.secret_key,
                                          getattr(cfg.mqtt.tls, "key_password", None)]  # fmt: skip
    out.extend(s.get_secret_value() for s in candidates if s is not None)
    return tuple(dict.fromkeys(s for s in out if s))


# Environment variables that override secrets (and the broker address) from the file.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "EDGE_AGENT_MQTT_HOST": ("mqtt", "host"),
    "EDGE_AGENT_MQTT_PORT": ("mqtt", "port"),
    "EDGE_AGENT_MQTT_USERNAME": ("mqtt", "username"),
    "EDGE_AGENT_MQTT_PASSWORD": ("mqtt", "password"),
    "EDGE_AGENT_STORAGE_ENDPOINT": ("storage", "endpoint"),
    "EDGE_AGENT_STORAGE_ACCESS_KEY": ("storage", "access_key"),
    "EDGE_AGENT_STORAGE_SECRET_KEY": ("storage", "secret_key"),
}


def _apply_env(raw: dict[str, Any], env: dict[str, str]) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in env:
            sect = raw.setdefault(section, {})
            if isinstance(sect, dict):
                sect[key] = env[var]
    cameras = raw.get("cameras")
    if isinstance(cameras, dict):
        for cam_id, cam in cameras.items():
            var = f"EDGE_AGENT_CAMERA_{str(cam_id).upper().replace('-', '_')}_URL"
            if var in env and isinstance(cam, dict):
                cam["url"] = env[var]


# Secrets that may be given as `<key>_file`: a path whose file holds the value (Docker secrets,
# systemd `LoadCredential=`; `$CREDENTIALS_DIRECTORY` and other variables in the path are expanded).
SECRET_FILE_KEYS: tuple[tuple[str, ...], ...] = (
    ("mqtt", "password"),
    ("mqtt", "tls", "key_password"),
    ("storage", "access_key"),
    ("storage", "secret_key"),
)


def _read_secret_file(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: must be a file path")
    path = Path(os.path.expandvars(value)).expanduser()
    try:
        with path.open("r", encoding="utf-8") as fh:
            text = fh.read(65536 + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not UTF-8 text") from None
    if len(text) > 65536:
        raise ConfigError(f"{where}: {path} is larger than 64 KiB; it should hold one secret")
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(f"{where}: {path} is empty")
    return secret


def _apply_secret_files(raw: dict[str, Any]) -> None:
    """Replace every `<key>_file` by the secret its file holds (both given: an error naming the key)."""
    for path in SECRET_FILE_KEYS:
        parent: Any = raw
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or f"{path[-1]}_file" not in parent:
            continue
        where = ".".join(path) + "_file"
        if parent.get(path[-1]) is not None:
            raise ConfigError(f"{where}: give either {'.'.join(path)} or {where}, not both")
        parent[path[-1]] = _read_secret_file(where, parent.pop(f"{path[-1]}_file"))
    cameras = raw.get("cameras")
    if isinstance(cameras, dict):
        for cam_id, cam in cameras.items():
            if isinstance(cam, dict) and "url_file" in cam:
                where = f"cameras.{cam_id}.url_file"
                if cam.get("url") is not None:
                    raise ConfigError(f"{where}: give either cameras.{cam_id}.url or {where}, not both")
                cam["url"] = _read_secret_file(where, cam.pop("url_file"))


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad key, as `mqtt.port: Input should be ...` (never echoing secret values)."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(raw: object, env: dict[str, str] | None = None) -> AgentConfig:
    """Validate an already-parsed YAML document (plus environment overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a YAML mapping at the top level")
    _apply_secret_files(raw)
    _apply_env(raw, dict(os.environ) if env is None else env)
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: Path, env: dict[str, str] | None = None) -> AgentConfig:
    """Read and validate `agent.yaml`; raises ConfigError naming each problem."""
    return parse_config(read_yaml(path), env)


def read_yaml(path: Path) -> dict[str, Any]:
    """`agent.yaml` as a mapping, not yet validated (the base a desired document is merged onto)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the problem and its position: PyYAML's full text quotes the line, which may hold a secret.
        problem = getattr(exc, "problem", None) or "syntax error"
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a YAML mapping at the top level")
    return raw
