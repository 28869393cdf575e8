from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.config import ConfigError, Settings, load_settings


def test_defaults_run_on_one_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={})
    assert settings.database_url == "sqlite:///newsletter.db"
    assert (settings.smtp_host, settings.smtp_port) == ("127.0.0.1", 1025)
    assert settings.smtp_tls == "none"


def test_environment_beats_toml_beats_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "n.toml"
    toml.write_text(
        'smtp_port = 2525\nsmtp_host = "mail.example.org"\nfrom = "A <a@example.org>"\n'
        '[synonyms]\nllm = ["large language model", "foundation model"]\n',
        encoding="utf-8",
    )
    settings = load_settings(
        env={"NEWSLETTER_SMTP_PORT": "587", "NEWSLETTER_SMTP_TLS": "starttls"}, config_file=toml
    )
    assert settings.smtp_port == 587
    assert settings.smtp_host == "mail.example.org"
    assert settings.smtp_tls == "starttls"
    assert settings.from_addr == "A <a@example.org>"
    assert settings.synonyms == {"llm": ("large language model", "foundation model")}


def test_newsletter_from_alias_and_synonyms_from_env() -> None:
    settings = load_settings(
        env={
            "NEWSLETTER_FROM": "Digest <d@example.org>",
            "NEWSLETTER_SYNONYMS": "rl=reinforcement learning;gp=gaussian process|kriging",
            "NEWSLETTER_CONFIG": "",
        },
        config_file=None,
    )
    assert settings.from_addr == "Digest <d@example.org>"
    assert settings.synonyms["gp"] == ("gaussian process", "kriging")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NEWSLETTER_SMTP_TLS": "maybe"}, "smtp_tls must be one of"),
        ({"NEWSLETTER_SMTP_PORT": "seventy"}, "smtp_port must be a number"),
        ({"NEWSLETTER_SMTP_PORT": "70000"}, "smtp_port must be a TCP port"),
        ({"NEWSLETTER_SMTP_CONNECTIONS": "0"}, "smtp_connections must be at least 1"),
        ({"NEWSLETTER_CONFIG": "/no/such/file.toml"}, "does not exist"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    toml = tmp_path / "n.toml"
    toml.write_text("smtp_prot = 25\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env={}, config_file=toml)


def test_secrets_never_shown() -> None:
    settings = Settings(smtp_password="hunter2", secret_key="s3cr3t")
    shown = f"{settings!r} {settings.redacted()}"
    assert "hunter2" not in shown and "s3cr3t" not in shown
    assert settings.redacted()["smtp_password"] == "***"
