"""The one place that touches fastrtc's and aiortc's private parts.

Written for fastrtc 0.0.34 and aiortc 1.16 (compat.WRITTEN_FOR, checked at import): an upgrade that
moves any of these internals should break here, in one module, and nowhere else.
"""

import asyncio
import logging

import av
from fastrtc import Stream
from fastrtc.utils import get_current_context
from fastrtc.websocket import WebSocketHandler

from . import WRITTEN_FOR, check_versions

logger = logging.getLogger(__name__)

check_versions({package: WRITTEN_FOR[package] for package in ("fastrtc", "aiortc")})  # at import: nothing below
# works on another version


def buffer_less_audio(packets: int) -> None:
    """Make aiortc's receivers buffer at most `packets` audio packets (its default 4 adds 60 ms to every
    turn; it has no public setting). Process-wide: it covers the Gradio page's connections too."""
    from aiortc import jitterbuffer, rtcrtpreceiver

    class AudioJitterBuffer(jitterbuffer.JitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False):
            super().__init__(capacity, prefetch if is_video else min(prefetch, packets), is_video)

    rtcrtpreceiver.JitterBuffer = AudioJitterBuffer


def end_tracks_quietly() -> None:
    """A track that has ended says so the way aiortc expects (MediaStreamError), not with None.

    fastrtc's AudioCallback.recv returns None once its stream has ended (a CloseStream, such as the
    one for a peer gone silent when a tab closes without Stop); aiortc's sender then packs None as an
    encoded frame and logs an AttributeError traceback at WARNING for every such hang-up. A None from
    a track still live (a fault inside fastrtc) is left as it was, traceback and all."""
    from aiortc.mediastreams import MediaStreamError
    from fastrtc.tracks import AudioCallback

    if getattr(AudioCallback.recv, "ends_quietly", False):
        return
    recv = AudioCallback.recv

    async def recv_or_end(self):
        frame = await recv(self)
        if frame is None and self.readyState != "live":
            raise MediaStreamError
        return frame

    recv_or_end.ends_quietly = True
    AudioCallback.recv = recv_or_end


def event_loop_kind() -> str:
    """"uvloop" or "asyncio": which event loop serves the WebRTC connections.

    asyncio's own loop reads one datagram per UDP socket per loop iteration. Under load (8 connections
    on 2 cores) an iteration took longer than the 20 ms between audio packets, so each peer's socket
    queued packets, and the ICE consent answers behind them arrived 0.5-2 s late. aioice 0.13 waits
    0.5 s for each answer and closes the connection after six misses in a row: 7 of 8 connections died
    ~35 s after connecting (bench/soak.py, with aioice's debug log). uvloop (libuv) reads every
    queued datagram, up to 32, per wake-up; on it none died. uvicorn picks uvloop when it is installed."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


def resample_each_frame(handler, frame: av.AudioFrame):
    """fastrtc keeps the input frame's sample count (960 at 48 kHz) when resampling: at 16 kHz that
    is 60 ms lumps. This resampler passes each 20 ms frame on as soon as it arrives."""
    if handler._resampler is None:
        handler._resampler = av.AudioResampler(format="s16", layout=handler.expected_layout,
                                               rate=handler.input_sample_rate, frame_size=None)
    yield from handler._resampler.resample(frame)


def tell_twilio_to_clear(handler) -> None:
    """Twilio keeps playing what it has buffered until told to clear (phone barge-in)."""
    context = get_current_context()
    if context.websocket is not None:
        asyncio.run_coroutine_threadsafe(
            context.websocket.send_json({"event": "clear", "streamSid": context.webrtc_id}), handler.loop)


async def drop_connection(mixin, webrtc_id: str) -> None:
    """Close and forget a WebRTC connection (half-built, never connected, or whose peer went silent).
    `mixin`: the Stream, or the page's WebRTC component (each keeps its own peer connections)."""
    pc = mixin.pcs.pop(webrtc_id, None)
    mixin.clean_up(webrtc_id)
    if pc is not None:
        await pc.close()


def peers(mixin) -> list[tuple[str, str, object]]:
    """(connection id, aiortc connectionState, its handler copy) for each peer connection."""
    return [(connection_id, pc.connectionState, mixin.handlers.get(connection_id))
            for connection_id, pc in list(mixin.pcs.items())]


def page_components(blocks) -> list:
    """The page's WebRTC components: each keeps its own peer connections, apart from the Stream's."""
    from fastrtc import WebRTC

    return [block for block in blocks.blocks.values() if isinstance(block, WebRTC)]


def is_connected(stream: Stream, connection_id: str) -> bool:
    return connection_id in stream.connections


def is_known(stream: Stream, connection_id: str) -> bool:
    """Whether fastrtc holds anything under this id (a peer, a socket, an outputs queue)."""
    return connection_id in stream.pcs or connection_id in stream.connections or connection_id in stream.handlers


OUTPUTS_KEPT = 64  # chat updates a connection's reader may lag behind; older ones are dropped


def bounded_outputs(stream: Stream, connection_id: str):
    """fastrtc's setter for a connection's AdditionalOutputs, with its queue bounded. fastrtc queues
    every update until someone reads it; a client that never opens /outputs (or a page that stopped
    reading) would pile up a copy of the chat per streamed token. Each update carries the whole chat,
    so the newest `OUTPUTS_KEPT` say all there is. Called on the event loop, as fastrtc's setter is."""
    put = stream.set_additional_outputs(connection_id)

    def bounded(outputs) -> None:
        pending = output_queue(stream, connection_id).queue
        while pending.qsize() >= OUTPUTS_KEPT:
            pending.get_nowait()
        put(outputs)

    return bounded


def output_queue(stream: Stream, connection_id: str):
    """fastrtc's queue of a connection's AdditionalOutputs (made on first use, as fastrtc does)."""
    return stream.additional_outputs[connection_id]


async def next_output(outputs, timeout_s: float):
    """The next AdditionalOutputs from `output_queue()`, or None after `timeout_s`; EOFError once the
    connection has ended."""
    if outputs.quit.is_set():
        raise EOFError
    try:
        return await asyncio.wait_for(outputs.queue.get(), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        if outputs.quit.is_set():
            raise EOFError from None
        return None


async def serve_websocket(stream: Stream, handler, websocket) -> None:
    """Run fastrtc's WebSocket protocol (its own and Twilio's Media Streams) for one connection."""

    async def register(stream_id: str, socket_handler: WebSocketHandler):
        stream.connections[stream_id] = [socket_handler]

    socket = WebSocketHandler(handler, register, stream.clean_up, lambda socket_id: bounded_outputs(stream, socket_id))
    await socket.handle_websocket(websocket)



def end_unknown_outputs(component) -> None:
    """fastrtc's `output_stream` (the page's chat updates) waits for ever for an id that never
    connects, holding one of the event's `concurrency_limit` places: a few made-up ids stopped every
    page's chat. Here it ends at once for an id that is not a peer of `component` (the page asks for
    its updates only once its peer is up: fastrtc's "fetch_output" message), and when the peer goes.
    Nothing is made for an unknown id."""
    streamed = component.output_stream

    def known(webrtc_id) -> bool:
        return isinstance(webrtc_id, str) and webrtc_id in component.pcs

    async def output_stream(webrtc_id):
        if not known(webrtc_id):
            logger.info("ended a request for the chat updates of a connection that is not up")
            return
        async for outputs in streamed(webrtc_id):
            yield outputs
            if not known(webrtc_id):
                return

    component.output_stream = output_stream


def check_page_offers(component, handle) -> None:
    """Send the page's WebRTC offers and ICE candidates (gradio's component_server "offer", which
    calls the component's `offer(body)`) through `await handle(component, offer, body, address)`,
    which may answer with fastrtc's failure body instead of calling `offer(body)`; `address` is the
    client's (gradio hands a server function its request when the parameter is typed gr.Request)."""
    import gradio as gr

    offer = component.offer

    async def checked_offer(body, request: gr.Request):
        client = getattr(request, "client", None)
        return await handle(component, offer, body, getattr(client, "host", "") or "")

    checked_offer._is_server_fn = True  # gradio's component_server calls only functions marked so
    component.offer = checked_offer
