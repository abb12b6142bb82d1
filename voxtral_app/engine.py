"""The embedding path the README first documented (`from voxtral_app.engine import EngineOptions`);
the code lives in voxtral_app.model.engine."""

from .model.engine import Engine, EngineOptions  # noqa: F401
