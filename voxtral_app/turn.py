"""Turn-taking: when has the person finished speaking, and when do they cut in?

fastrtc's default ReplyOnPause re-runs the VAD on whole 0.6 s chunks and waits for a silent one,
so a reply starts 0.6-1.2 s after the person stops. Here the Silero VAD runs streaming over 32 ms
windows and a turn ends after `pause_s` of silence. That short pause would split sentences with a
thinking pause in them, so an ended turn stays open for `resume_s`: if speech comes back within
it, the reply already started is retracted and the two parts become one turn ("resume"). Speech
that starts later, while a reply is playing, is a barge-in ("speech").
"""

import logging
import time
from dataclasses import dataclass

import numpy as np

from .vad import WINDOW, WINDOW_S, SpeechDetector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnOptions:
    threshold: float = 0.5  # speech probability that counts as speech
    release: float = 0.35  # speech probability below which speech has stopped (hysteresis)
    start_s: float = 0.064  # speech needed to start a turn (2 windows): a click is not a turn
    speculate_s: float = 0.064  # silence after which the reply is prepared (encoder, prefill), unseen
    pause_s: float = 0.128  # silence that ends a turn; the prepared reply is shown then
    resume_s: float = 0.8  # speech back within this long after a turn ended continues that turn
    preroll_s: float = 0.2  # audio kept from before speech was detected (soft onsets)
    max_turn_s: float = 60.0  # endless speech is cut into turns of at most this long


@dataclass
class TurnEvent:
    kind: str  # "speech": new speech began (barge-in); "pause": a short silence, prepare a reply;
    # "continue": speech back before the turn ended (drop that); "end": the turn is over;
    # "resume": speech back within resume_s of the end (take the reply back, the turn goes on)
    audio: np.ndarray | None = None  # "pause", "end": the turn so far, float32 16 kHz
    speech_end: float = 0.0  # "pause", "end": perf_counter time the last speech window arrived


class TurnTaker:
    """Streaming VAD state machine for one connection: feed 16 kHz audio, get turn events."""

    def __init__(self, options: TurnOptions = TurnOptions()):
        self.options = options
        self.vad = SpeechDetector()
        self.windows: list[np.ndarray] = []  # the turn being spoken (or just ended), 32 ms windows
        self.pending = np.zeros(0, dtype=np.float32)
        self.state = "idle"  # idle -> speaking -> (pause) -> ended -> idle | speaking (resume)
        self.speech_run = 0  # consecutive speech windows while idle/ended
        self.silence = 0  # consecutive silent windows while speaking / since the turn ended
        self.last_speech = 0.0

    def feed(self, audio: np.ndarray) -> list[TurnEvent]:
        """Float32 16 kHz samples -> the turn events they complete, in order."""
        self.pending = np.concatenate([self.pending, audio])
        count = len(self.pending) // WINDOW
        windows = [self.pending[i * WINDOW:(i + 1) * WINDOW] for i in range(count)]
        self.pending = self.pending[count * WINDOW:]
        probs = self.vad.probabilities(np.concatenate(windows)) if windows else []
        now = time.perf_counter()
        events = []
        for window, prob in zip(windows, probs):
            event = self.step(window, float(prob), now)
            if event is not None:
                events.append(event)
        return events

    def step(self, window: np.ndarray, prob: float, now: float) -> TurnEvent | None:
        o = self.options
        self.windows.append(window)
        if self.state == "speaking":
            if prob >= o.release:
                paused = self.silence * WINDOW_S >= o.speculate_s
                self.silence = 0
                self.last_speech = now
                if paused:
                    return TurnEvent("continue")
            else:
                self.silence += 1
                if self.silence == max(1, round(o.speculate_s / WINDOW_S)) and o.speculate_s < o.pause_s:
                    return TurnEvent("pause", np.concatenate(self.windows), self.last_speech)
            too_long = len(self.windows) * WINDOW_S >= o.max_turn_s
            if self.silence * WINDOW_S >= o.pause_s or too_long:
                self.state = "ended" if not too_long else "idle"
                self.silence = 0
                self.speech_run = 0
                turn = np.concatenate(self.windows)
                if too_long:
                    logger.info("turn reached %.0f s of speech; replying to it now", o.max_turn_s)
                    self.windows = []
                return TurnEvent("end", turn, self.last_speech)
            return None

        # idle or ended: wait for enough speech to (re)start a turn
        self.speech_run = self.speech_run + 1 if prob >= o.threshold else 0
        if self.state == "ended":
            self.silence += 1
            if self.silence * WINDOW_S > o.resume_s and self.speech_run == 0:
                self.state = "idle"
                self.windows = self.windows[-self.preroll_windows:]
        else:
            self.windows = self.windows[-self.preroll_windows:]
        if self.speech_run * WINDOW_S >= o.start_s:
            resumed = self.state == "ended"
            if not resumed:
                self.windows = self.windows[-(self.preroll_windows + self.speech_run):]
            self.state = "speaking"
            self.silence = 0
            self.last_speech = now
            return TurnEvent("resume" if resumed else "speech")
        return None

    @property
    def preroll_windows(self) -> int:
        return max(1, round(self.options.preroll_s / WINDOW_S))
