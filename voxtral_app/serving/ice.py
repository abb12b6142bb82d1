"""ICE servers: the STUN/TURN servers a browser uses to reach this server over WebRTC.

On localhost or a LAN nothing is needed. Behind NAT (a Hugging Face Space, a cloud VM without open
UDP ports) the media has to go through a TURN relay. `rtc_configuration(options)` returns what
`ServerOptions(rtc_configuration=...)` takes, first match wins:

1. `--turn-url` (+ `--turn-username`, `--turn-credential`): your own TURN server, a fixed dict.
2. `--rtc-configuration '{"iceServers": [...]}'` (or VOXTRAL_RTC_CONFIGURATION): a whole
   RTCConfiguration, as the browser's `new RTCPeerConnection(config)` takes it.
3. `--turn-provider` (on a Space, where SPACE_ID is set: "cloudflare" unless told otherwise):
   short-lived credentials from fastrtc's credential services, as fastrtc documents for Spaces
   (https://fastrtc.org/deployment/). "cloudflare" uses the HF_TOKEN secret (free Cloudflare TURN
   through Hugging Face) or CLOUDFLARE_TURN_KEY_ID + CLOUDFLARE_TURN_KEY_API_TOKEN; "twilio" uses
   TWILIO_ACCOUNT_SID + TWILIO_AUTH_TOKEN; "hf" is fastrtc's older Hugging Face endpoint (HF_TOKEN).
   The result is a function: fastrtc calls it (in a worker thread) each time a page connects, so
   every browser gets fresh credentials instead of ones fetched at start that expire.
4. Nothing: None, the browser's own host candidates (fine on localhost and LANs).
"""

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PROVIDERS = ("cloudflare", "twilio", "hf")
CREDENTIALS_TTL_S = 3600  # a browser's TURN credentials last 1 h: longer than a session (15 min by default)

NEEDS = {  # environment variables each provider reads (any one group is enough)
    "cloudflare": (("HF_TOKEN",), ("CLOUDFLARE_TURN_KEY_ID", "CLOUDFLARE_TURN_KEY_API_TOKEN")),
    "twilio": (("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"),),
    "hf": (("HF_TOKEN",),),
}


@dataclass(frozen=True)
class IceOptions:
    turn_url: str | None = None  # "turn:host:3478" or several, comma-separated (turn:, turns:, stun:)
    turn_username: str | None = None
    turn_credential: str | None = None
    rtc_configuration: str | None = None  # JSON RTCConfiguration: {"iceServers": [{"urls": ..., ...}]}
    turn_provider: str | None = None  # "cloudflare", "twilio" or "hf"; None: "cloudflare" on a Space, else none


def rtc_configuration(options: IceOptions, environ: Mapping[str, str] = os.environ,
                      fetch: Callable[..., dict] | None = None) -> dict | Callable[[], dict] | None:
    """The browser's RTCConfiguration, or a function that fetches one per connection; ValueError if malformed.

    No network here: a provider is only asked when a page connects. `fetch`: the credentials function
    (tests pass a fake); default: fastrtc's for the provider.
    """
    if options.turn_url:
        return turn_server(options.turn_url, options.turn_username, options.turn_credential)
    if options.rtc_configuration:
        return parse_configuration(options.rtc_configuration)
    provider = turn_provider(options, environ)
    if provider is None:
        return None
    if provider not in PROVIDERS:
        raise ValueError(f"unknown TURN provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    kwargs = {} if provider == "twilio" else {"ttl": CREDENTIALS_TTL_S}  # Twilio's tokens last 24 h

    def fresh_credentials() -> dict:  # a plain function: fastrtc calls values that `inspect.isfunction`
        from fastrtc import credentials

        get = fetch or {"cloudflare": credentials.get_cloudflare_turn_credentials,
                        "twilio": credentials.get_twilio_turn_credentials,
                        "hf": credentials.get_hf_turn_credentials}[provider]
        configuration = get(**kwargs)
        if not isinstance(configuration, dict) or not configuration.get("iceServers"):
            raise RuntimeError(f"TURN provider {provider} sent no ICE servers: {str(configuration)[:200]}")
        return configuration

    return fresh_credentials


def turn_provider(options: IceOptions, environ: Mapping[str, str] = os.environ) -> str | None:
    if options.turn_url or options.rtc_configuration:
        return None
    return options.turn_provider or ("cloudflare" if environ.get("SPACE_ID") else None)


def missing_credentials(options: IceOptions, environ: Mapping[str, str] = os.environ) -> str | None:
    """What to set when the TURN provider in use has no credentials in the environment, else None."""
    provider = turn_provider(options, environ)
    if provider not in NEEDS or any(all(environ.get(name) for name in group) for group in NEEDS[provider]):
        return None
    where = " as a secret in the Space's settings" if environ.get("SPACE_ID") else ""
    return (f"browsers outside this network cannot connect over WebRTC: TURN provider {provider} needs "
            + " or ".join(" + ".join(group) for group in NEEDS[provider]) + where)


def turn_server(urls: str, username: str | None, credential: str | None) -> dict:
    urls = [url.strip() for url in urls.split(",") if url.strip()]
    for url in urls:
        if not url.startswith(("turn:", "turns:", "stun:")):
            raise ValueError(f"TURN URL {url!r} must start with turn:, turns: or stun:")
    if any(url.startswith("turn") for url in urls) and not (username and credential):
        raise ValueError("a TURN server needs --turn-username and --turn-credential")
    server = {"urls": urls}
    if username:
        server.update(username=username, credential=credential or "")
    return {"iceServers": [server]}


def parse_configuration(text: str) -> dict:
    try:
        configuration = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"RTC configuration is not JSON: {error}") from None
    servers = configuration.get("iceServers") if isinstance(configuration, dict) else None
    if not isinstance(servers, list) or not servers or not all(
            isinstance(server, dict) and server.get("urls") for server in servers):
        raise ValueError('RTC configuration must look like {"iceServers": [{"urls": [...], ...}]}')
    return configuration
