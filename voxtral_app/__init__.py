"""Voxtral realtime: talk to Mistral's Voxtral from a browser, a phone or your own service.

The package is layered in the order audio flows (docs/architecture.md); a layer imports only the
layers listed before it (tests/test_layers.py):

    compat        third-party internals, each with the versions it was written for
    audio         PCM, resampling, noise suppression and gain, voice activity
    backends      what generates replies: the contract, and the OpenAI-compatible (vLLM) client
    model         the local Voxtral engine: KV-cache slots, decoder, prompts, loading
    turns         turn-taking: when has the person finished speaking (Smart Turn at the pause)
    conversation  one person's conversation: turns in, typed events out; spoken replies
    serving       FastAPI app, WebRTC/WebSocket/phone, the page, session API, /v1, metrics, guards
    client        a Python client for the WebRTC route
    cli           command-line flags and environment variables

Nothing is imported here, so `import voxtral_app.model` needs no web stack (the GPU bench).
"""

__version__ = "0.9.0"
