"""The embedding path the README first documented (`from voxtral_app.server import create_app`); the
code lives in voxtral_app.serving.app."""

from .serving.app import ServerOptions, create_app  # noqa: F401
