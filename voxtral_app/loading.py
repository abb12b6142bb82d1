"""The embedding path the README first documented (`from voxtral_app.loading import load_engine`);
the code lives in voxtral_app.model.loading."""

from .model.loading import ModelLoadError, load_engine  # noqa: F401
