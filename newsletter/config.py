"""Settings: safe built-in defaults, overridden by an optional TOML file, overridden by env.

Every key can be set as ``NEWSLETTER_<KEY>`` in the environment or as ``<key> = …`` in the TOML
file (``NEWSLETTER_CONFIG``, else ``./newsletter.toml`` when present). The defaults run the whole
product on one machine with nothing else installed: a SQLite file in the working directory and the
built-in SMTP sink on 127.0.0.1:1025.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

TlsMode = Literal["none", "starttls", "tls"]

ENV_PREFIX = "NEWSLETTER_"
# Names people expect that are not valid Python identifiers (``from``) map onto fields.
ALIASES = {"from": "from_addr"}
DEFAULT_CONFIG_FILE = "newsletter.toml"


class ConfigError(ValueError):
    """A setting has a value the service cannot use; the message names the setting."""


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "sqlite:///newsletter.db"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_tls: TlsMode = "none"
    smtp_timeout: float = 30.0
    smtp_connections: int = 16
    send_processes: int = 0  # 0: one per CPU core; smtp_connections are shared between them
    smtp_messages_per_connection: int = 100
    smtp_unreachable_patience: float = 60.0
    from_addr: str = "Paper Digest <digest@localhost>"
    reply_to: str = ""
    list_id: str = "Paper Digest <digest.localhost>"
    base_url: str = "http://127.0.0.1:8000"
    secret_key: str = field(default="", repr=False)
    templates_dir: str = ""
    synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fetch_timeout: float = 20.0
    fetch_max_bytes: int = 10 * 1024 * 1024
    entry_window_days: int = 7
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    suppress_after_failures: int = 1
    lease_seconds: float = 300.0
    sink_host: str = "127.0.0.1"
    sink_port: int = 1025
    sink_dir: str = "var/sink"
    # web app
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    rate_limit_per_client: str = "30/minute"
    rate_limit_per_address: str = "5/hour"
    link_cooldown_seconds: int = 300
    # background service
    fetch_interval_minutes: int = 60
    catch_up_hours: int = 24
    worker_poll_seconds: float = 5.0
    shutdown_grace_seconds: float = 30.0
    log_json: bool = False
    # deliverability
    dkim_selector: str = ""
    dkim_private_key: str = field(default="", repr=False)
    dkim_private_key_path: str = ""
    dkim_domain: str = ""
    bounce_domain: str = ""
    bounce_host: str = "127.0.0.1"
    bounce_port: int = 2525
    soft_bounce_limit: int = 3
    soft_bounce_window_days: int = 14
    postal_address: str = ""

    def __post_init__(self) -> None:
        if self.smtp_tls not in get_args(TlsMode):
            raise ConfigError(
                f"smtp_tls must be one of {', '.join(get_args(TlsMode))}, not {self.smtp_tls!r}"
            )
        for name in ("smtp_port", "sink_port", "web_port", "bounce_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a TCP port (0-65535), not {port}")
        for name in ("smtp_connections", "smtp_messages_per_connection", "max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")

    def redacted(self) -> dict[str, Any]:
        """A printable view: secrets are never shown, not even their length."""
        out = dataclasses.asdict(self)
        for secret in ("smtp_password", "secret_key", "dkim_private_key"):
            out[secret] = "***" if out[secret] else ""
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Turn a TOML or environment value into the type of the default, or say what is wrong."""
    if name == "synonyms":
        return _coerce_synonyms(raw)
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            return str(raw).strip().lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not isinstance(raw, str):
        raise ConfigError(f"{name} must be a string, not {raw!r}")
    return raw


def _coerce_synonyms(raw: Any) -> dict[str, tuple[str, ...]]:
    """Synonyms come as a TOML table ``{llm = ["large language model"]}`` or, in the
    environment, as ``llm=large language model|foundation model;rl=reinforcement learning``."""
    table: dict[str, tuple[str, ...]] = {}
    if isinstance(raw, str):
        for item in filter(None, (part.strip() for part in raw.split(";"))):
            key, sep, values = item.partition("=")
            if not sep:
                raise ConfigError(f"synonyms entry {item!r} needs the form term=expansion|other")
            table[key.strip().lower()] = tuple(v.strip() for v in values.split("|") if v.strip())
        return table
    if not isinstance(raw, Mapping):
        raise ConfigError("synonyms must be a table of term = [expansions]")
    for key, values in raw.items():
        items = [values] if isinstance(values, str) else values
        table[str(key).lower()] = tuple(str(v) for v in items)
    return table


def load_settings(
    env: Mapping[str, str] | None = None, config_file: str | os.PathLike[str] | None = None
) -> Settings:
    """Defaults < TOML file < environment. An explicit file that does not exist is an error;
    the implicit ./newsletter.toml is optional."""
    env = os.environ if env is None else env
    defaults = Settings()
    values: dict[str, Any] = {}
    known = {f.name for f in fields(Settings)}

    path_text = config_file or env.get(f"{ENV_PREFIX}CONFIG")
    path = Path(path_text) if path_text else Path(DEFAULT_CONFIG_FILE)
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        data = data.get("newsletter", data)
        data = {ALIASES.get(key, key): value for key, value in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s): {', '.join(unknown)}")
        for key, raw in data.items():
            values[key] = _coerce(key, raw, getattr(defaults, key))
    elif path_text:
        raise ConfigError(f"config file {path} does not exist")

    env_names = {f.name: [ENV_PREFIX + f.name.upper()] for f in fields(Settings)}
    for alias, target in ALIASES.items():
        env_names[target].insert(0, ENV_PREFIX + alias.upper())
    for f in fields(Settings):
        raw_env = next((env[n] for n in env_names[f.name] if env.get(n)), None)
        if raw_env is not None and raw_env != "":
            values[f.name] = _coerce(f.name, raw_env, getattr(defaults, f.name))
    return Settings(**values)
