"""Command-line flags that fall back to environment variables, typed and checked at start.

`EnvParser().add_argument("--port", type=port, default=7860, env=("PORT", "GRADIO_SERVER_PORT"))`:
a flag on the command line wins; else the first of its variables that is set and not empty; else
the default. An environment value goes through the option's `type` (or `env_type`) and `choices`,
and a bad one is an error that names the variable. Errors are one line on stderr, exit status 2.
Only the standard library is imported here, so `python app.py --help` answers at once.
"""

import argparse
import os
from collections.abc import Callable, Mapping

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class EnvParser(argparse.ArgumentParser):
    def __init__(self, *args, environ: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.environ = os.environ if environ is None else environ
        self.fallbacks: list[tuple[argparse.Action, tuple[str, ...], Callable | None, object]] = []

    def add_argument(self, *flags, env: tuple[str, ...] = (), env_type: Callable | None = None, **kwargs):
        if not env:
            return super().add_argument(*flags, **kwargs)
        default = kwargs.pop("default", None)
        shown = "" if default is None else f"default: {default}; "
        kwargs["help"] = f"{kwargs.get('help') or ''} [{shown}env: {', '.join(env)}]".replace("%", "%%").strip()
        action = super().add_argument(*flags, default=argparse.SUPPRESS, **kwargs)  # unset unless given
        self.fallbacks.append((action, tuple(env), env_type or action.type, default))
        return action

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action, names, convert, default in self.fallbacks:
            if not hasattr(namespace, action.dest):
                setattr(namespace, action.dest, self.from_environment(action, names, convert, default))
        return namespace, extras

    def error(self, message: str):
        """One line on stderr, exit status 2: a bad value reads as itself, not under a screen of usage."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def from_environment(self, action: argparse.Action, names: tuple[str, ...], convert: Callable | None, default):
        for name in names:
            text = self.environ.get(name, "").strip()
            if not text:
                continue
            try:
                value = convert(text) if convert else text
            except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
                self.error(f"{name}={text!r}: {error}")
            if action.choices is not None and value not in action.choices:
                self.error(f"{name}={text!r}: choose from {', '.join(map(str, action.choices))}")
            return value
        return default


def whole_number(what: str, low: int, high: int) -> Callable[[str], int]:
    """A converter for a whole number (`what`: "port number") from `low` to `high`."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a {what} from {low} to {high}, got {value}")
        return value

    return convert


sessions = whole_number("number of sessions", 1, 1024)  # conversations at once
reply_tokens = whole_number("number of tokens", 1, 4096)  # longest chat reply
port = whole_number("port number", 1, 65535)


audio_turns = whole_number("number of spoken turns", 1, 5)  # vLLM's limit for Voxtral: 5 clips a prompt


def seconds(text: str) -> float:
    """A duration: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def temperature(text: str) -> float:
    value = seconds(text)
    if value > 1:  # the page's slider goes from 0 to 1
        raise argparse.ArgumentTypeError(f"expected a temperature from 0 to 1, got {value}")
    return value


def switch(text: str) -> bool | None:
    """true/false (1/0, yes/no, on/off); "auto" is None: let the program decide."""
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
             "off": False, "auto": None}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected true, false or auto, got {text!r}")
    return words[text.lower()]


def log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.upper()


def backend_url(text: str) -> str:
    """--backend-url: an OpenAI-compatible server's base URL (backends.openai.base_url)."""
    from .backends.openai import base_url

    try:
        return base_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
