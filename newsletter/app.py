"""The application object: owns settings, the database engine and the signing secret, so that
every command, the web app and the scheduler share one way of reaching them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from functools import cached_property

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter import db
from newsletter.config import Settings, load_settings
from newsletter.models import Setting

SECRET_KEY_SETTING = "secret_key"


class SecretKeyMissing(RuntimeError):
    pass


@dataclass
class App:
    settings: Settings = field(default_factory=load_settings)

    @cached_property
    def engine(self) -> Engine:
        return db.make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return db.session_factory(self.engine)

    def session(self) -> Session:
        return self.sessions()

    def init(self) -> bool:
        """Create or upgrade the schema and make sure a secret key exists. Safe to repeat.
        Returns True when a new secret key was created."""
        db.upgrade(self.engine)
        if self.settings.secret_key:
            return False
        with db.transaction(self.sessions) as session:
            if session.get(Setting, SECRET_KEY_SETTING) is None:
                session.add(Setting(key=SECRET_KEY_SETTING, value=secrets.token_urlsafe(48)))
                return True
        return False

    @cached_property
    def secret_key(self) -> str:
        """NEWSLETTER_SECRET_KEY wins; else the key `init` stored in the database, so that every
        process sharing the database signs and verifies links alike."""
        if self.settings.secret_key:
            return self.settings.secret_key
        with self.session() as session:
            value = session.scalar(select(Setting.value).where(Setting.key == SECRET_KEY_SETTING))
        if not value:
            raise SecretKeyMissing(
                "no secret key: run `newsletter init` (it creates one) or set NEWSLETTER_SECRET_KEY"
            )
        return value

    def check_ready(self) -> None:
        db.check_ready(self.engine)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
