"""What an offer must be before fastrtc sees it: well-formed JSON with an audio track, and an SDP
within bounds.

`check_offer` runs on a worker thread (it parses the SDP); fastrtc then hands the SDP to aiortc,
which parses it again on the event loop, and aioice tries every remote candidate it lists. The
bounds below keep that second parse to a few ms (bench/sdp_parse.py) and the candidates few.
"""

import collections
import json

from aiortc.sdp import SessionDescription
from pydantic import BaseModel

from .access import CANDIDATES_PER_CONNECTION

SDP_MEDIA_SECTIONS = 4  # m= lines an offer may have: aiortc's and the page's have 2 (audio, data channel),
# a browser that also offers video 3
SDP_LINES_OF_A_KIND = 64  # a= lines of one kind in one section (or the session part): an audio section's
# most, its rtpmap lines, are ~15 in Chrome (4 in aiortc's)
SDP_LINES = 512  # lines in all: a browser's or aiortc's audio and data channel offer has 40-60, Chrome's
# with video too ~200
SDP_CHARS = 32_768  # characters in all: a browser's or aiortc's audio offer is 2-4 kB, Chrome's with video too
# ~10 kB (aiortc parses a long a=fmtp line parameter by parameter)


def check_sdp(sdp: str) -> None:
    """Refuse (ValueError) an SDP past the bounds above, before anything parses it: aiortc parses an
    accepted one again on the event loop, and aioice tries every candidate it lists."""
    if len(sdp) > SDP_CHARS:
        raise ValueError(f"an SDP may have at most {SDP_CHARS} characters")
    lines = sdp.splitlines()
    if len(lines) > SDP_LINES:
        raise ValueError(f"an SDP may have at most {SDP_LINES} lines")
    sections, candidates, kinds = 0, 0, collections.Counter()
    for line in lines:
        if line.startswith("m="):
            sections += 1
            kinds.clear()
            if sections > SDP_MEDIA_SECTIONS:
                raise ValueError(f"an SDP may have at most {SDP_MEDIA_SECTIONS} media sections")
        elif line.startswith("a="):
            kind = line[2:].partition(":")[0]
            kinds[kind] += 1
            if kinds[kind] > SDP_LINES_OF_A_KIND:
                raise ValueError(f"an SDP section may have at most {SDP_LINES_OF_A_KIND} 'a={kind[:20]}' lines")
            candidates += kind == "candidate"
            if candidates > CANDIDATES_PER_CONNECTION:
                raise ValueError(f"an SDP may list at most {CANDIDATES_PER_CONNECTION} ICE candidates")


class Offer(BaseModel):
    sdp: str | None = None
    candidate: dict | None = None
    type: str
    webrtc_id: str


def check_offer(raw: bytes) -> Offer:
    """A request body -> a checked offer (JSON, fields, SDP with an audio track), or ValueError."""
    offer = Offer.model_validate(json.loads(raw))
    if not offer.webrtc_id.strip() or len(offer.webrtc_id) > 200:
        raise ValueError("webrtc_id must be a short non-empty string")
    if offer.type == "offer":
        if not offer.sdp:
            raise ValueError("an offer needs an sdp")
        check_sdp(offer.sdp)
        try:
            description = SessionDescription.parse(offer.sdp)
        except Exception as error:  # aiortc's parser asserts on some malformed lines
            raise ValueError(f"the SDP does not parse ({type(error).__name__})") from error
        if not any(media.kind == "audio" for media in description.media):
            raise ValueError("the offer has no audio track")
    elif offer.type != "ice-candidate" or offer.candidate is None:
        raise ValueError("type must be 'offer' (with sdp) or 'ice-candidate' (with candidate)")
    return offer
