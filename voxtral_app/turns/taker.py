"""Turn-taking: when has the person finished speaking, and when do they cut in?

fastrtc's default ReplyOnPause re-runs the VAD on whole 0.6 s chunks and waits for a silent one,
so a reply starts 0.6-1.2 s after the person stops. Here a streaming VAD (audio/vad.py: Silero, WebRTC or
energy) runs over 32 ms windows, after optional noise suppression and gain (audio/denoise.py; the level tests
below, new energy and the room's level, read the audio before it: suppression deepens the gaps between
other voices more than the voices, and babble then stood out from the room as the speaker would):
- after `end_of_turn.start_s` of silence (one window): Smart Turn (end_of_turn.py) starts deciding
  whether the person has finished;
- after `speculate_s`: "pause", the reply is prepared unseen;
- after `pause_s`: "end" (shown) if the model says finished ("complete"); otherwise the turn is held
  open until the model changes its mind on a recheck or `hold_s` of silence passes ("long_pause").
  Speech before the end is a "continue": the unseen reply is dropped, nothing flickers;
- without the model every `pause_s` of silence ends the turn ("pause"), as before the model;
- an ended turn stays open until `resume_s` after the speaker stopped: speech back within it retracts
  the reply ("resume");
  speech after that, while a reply plays, is a barge-in ("speech");
- never waiting forever: speech with no new energy for `stale_s` (steady noise or a hum the VAD takes
  for speech) counts as silence and ends the turn ("no_new_speech"); `background_s` of "speech" far
  quieter than the speaker (babble, a TV) ends it too ("background"); `max_turn_s` cuts endless speech
  ("max_turn").
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from ..audio.denoise import Cleaner, CleanOptions
from ..audio.pcm import SAMPLE_RATE
from ..audio.vad import (
    WINDOW,
    WINDOW_S,
    EnergyDetector,
    VadOptions,
    detector,
    level_dbfs,
)
from .end_of_turn import EndOfTurnModel, EndOfTurnOptions, shared_model

logger = logging.getLogger(__name__)

UNSENT_S = 0.5  # wall time past the audio's own that means the client stopped sending (not a late frame)
REASONS = ("complete", "long_pause", "pause", "no_new_speech", "background", "max_turn")  # why a turn ended


@dataclass(frozen=True)
class TurnOptions:
    threshold: float = 0.5  # speech probability that counts as speech
    release: float = 0.35  # speech probability below which speech has stopped (hysteresis)
    silence_dbfs: float = -60.0  # a window quieter than this is silence whatever the VAD says: Silero's state
    # says "speech" for a window or two after the sound stops (32-64 ms more before every pause; tests/test_turn.py)
    start_s: float = 0.064  # speech needed to start a turn (2 windows): a click is not a turn
    speculate_s: float = 0.064  # silence after which the reply is prepared (encoder, prefill), unseen
    pause_s: float = 0.128  # silence that ends a turn the end-of-turn model calls finished (or any, without it)
    resume_s: float = 1.0  # speech back within this long after the speaker stopped continues the turn (counted
    # from the speech, not the turn's end, so that it does not shrink when turns end sooner)
    preroll_s: float = 0.2  # audio kept from before speech was detected (soft onsets)
    max_turn_s: float = 60.0  # endless speech is cut into turns of at most this long
    stale_s: float = 1.0  # "speech" without a rise of energy this long is noise: it counts as silence
    energy_margin_db: float = 6.0  # a window this far above the quietest of the last energy_floor_s has new energy
    energy_floor_s: float = 1.0  # (syllables rise and fall several times a second; steady noise does not)
    foreground_db: float = 8.0  # "speech" less than this above the room's level (the 20th percentile of the last
    # 3 s's windows) is the room's (babble, a TV): it starts no turn, and `background_s` of it ends a turn ("background"; 0: off)
    background_s: float = 0.5  # (longer than the speaker's own soft sounds: a trailing consonant, a breath)
    vad: VadOptions = VadOptions()  # which VAD (--vad)
    cleaning: CleanOptions = CleanOptions()  # noise suppression / gain before everything (off by default)
    end_of_turn: EndOfTurnOptions = EndOfTurnOptions()  # Smart Turn at the pause (on by default)


def end_of_turn_model(options: EndOfTurnOptions):
    """The shared Smart Turn model, or None when it is off or its file is not installed (then every
    `pause_s` of silence ends a turn, as before the model; said once)."""
    global _model_missing
    if not options.enabled or _model_missing:
        return None
    try:
        return shared_model(options)
    except RuntimeError as error:
        _model_missing = True
        logger.warning("end-of-turn model off: %s", error)
        return None


_model_missing = False  # set once, by the first TurnTaker that found no model file


@dataclass
class TurnEvent:
    kind: str  # "speech": new speech began (barge-in); "pause": a short silence, prepare a reply;
    # "continue": speech back before the turn ended (drop that); "end": the turn is over;
    # "resume": speech back within resume_s of the end (take the reply back, the turn goes on)
    audio: np.ndarray | None = None  # "pause", "end": the turn so far, float32 16 kHz (cleaned if cleaning is on)
    speech_end: float = 0.0  # "pause", "end": clock time (perf_counter) the last speech window arrived
    reason: str = ""  # "end": one of REASONS
    finished: float | None = None  # "end": the end-of-turn model's last probability that the turn was over


class TurnTaker:
    """Streaming turn-taking for one connection: feed 16 kHz audio, get turn events.

    Owned by the thread that feeds it (fastrtc's receive thread). End-of-turn decisions run on the
    model's pool and come back as Futures; only this thread reads them.

    `model` decides whether a pause ends the turn: anything whose `check(audio)` returns a Future of the
    probability that the speaker has finished (tests script one); None, the shared Smart Turn model. It is
    asked only while `options.end_of_turn.enabled`. `clock` gives the wall time in seconds at which audio
    arrives (it stamps `speech_end`, and tells a client that sent nothing from one that sent silence).
    """

    def __init__(self, options: TurnOptions = TurnOptions(), model: EndOfTurnModel | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.options = options
        self.clock = clock
        self.vad = detector(options.vad)
        self.energy = EnergyDetector(VadOptions(margin_db=options.energy_margin_db, floor_s=options.energy_floor_s))
        self.room = EnergyDetector(VadOptions(margin_db=options.foreground_db, floor_s=3.0, floor_quantile=0.2))
        self.cleaner = Cleaner(options.cleaning) if options.cleaning.enabled else None
        enabled = options.end_of_turn.enabled
        self.model = model if model is not None and enabled else end_of_turn_model(options.end_of_turn)
        self.windows: list[np.ndarray] = []  # the turn being spoken (or just ended), 32 ms windows
        self.pending = np.zeros(0, dtype=np.float32)
        self.pending_raw = np.zeros(0, dtype=np.float32)  # the same audio before cleaning (when cleaning is on)
        self.state = "idle"  # idle -> speaking -> ended -> idle | speaking (resume)
        self.speech_run = 0  # consecutive speech windows while idle/ended
        self.silence = 0  # consecutive silent windows while speaking
        self.last_speech = 0.0
        self.since_speech = 0  # windows since the VAD last heard speech in the turn (audio time, as tests feed it fast)
        self.speech_at = 0.0  # ... and the clock's time of that window (wall time: a client may stop sending)
        self.quiet = 0  # consecutive windows without new speech energy
        self.background = 0  # windows of the room's speech since the speaker was last heard
        self.foreground = 0  # consecutive windows of the speaker's speech
        self.heard = 0  # consecutive windows the VAD called speech while idle/ended
        self.check: Future | None = None  # the end-of-turn decision running for this pause
        self.check_at = 0  # silent windows at which the next decision is due (while held)
        self.finished: float | None = None  # the model's last answer in this pause

    def feed(self, audio: np.ndarray) -> list[TurnEvent]:
        """Float32 16 kHz samples -> the turn events they complete, in order."""
        if self.cleaner is not None:  # the level tests read the audio before cleaning (a little ahead: < 10 ms)
            self.pending_raw = np.concatenate([self.pending_raw, audio])
            audio = self.cleaner.process(audio)
        self.pending = np.concatenate([self.pending, audio])
        count = len(self.pending) // WINDOW
        windows = [self.pending[i * WINDOW:(i + 1) * WINDOW] for i in range(count)]
        self.pending = self.pending[count * WINDOW:]
        if not windows:
            return []
        joined = raw = np.concatenate(windows)
        if self.cleaner is not None:
            raw, self.pending_raw = self.pending_raw[:count * WINDOW], self.pending_raw[count * WINDOW:]
        probs, energy, above = self.vad.probabilities(joined), self.energy.probabilities(raw), self.room.probabilities(raw)
        now = self.clock()  # when the last window's audio arrived; a window before it, WINDOW_S earlier
        events = []
        for k, (window, prob, rise, loud) in enumerate(zip(windows, probs, energy, above)):
            if level_dbfs(window) < self.options.silence_dbfs:  # no sound, no speech
                prob = 0.0
            self.quiet = 0 if rise >= 0.5 else self.quiet + 1
            background = self.options.foreground_db > 0 and prob >= self.options.release and loud < 0.5
            event = self.step(window, float(prob), background, now - (len(windows) - 1 - k) * WINDOW_S)
            if event is not None:
                events.append(event)
        return events

    def step(self, window: np.ndarray, prob: float, background: bool, now: float) -> TurnEvent | None:
        o = self.options
        stale = prob >= o.release and self.quiet * WINDOW_S >= o.stale_s  # the VAD hears speech, the level is flat
        # windows since the speaker was last heard (2 windows above the room's level: babble has lone peaks)
        speaker = prob >= o.release and not background
        self.foreground = self.foreground + 1 if speaker else 0
        self.background = 0 if self.foreground >= 2 else self.background + 1 if background or speaker else 0
        self.windows.append(window)
        self.since_speech += 1
        if self.state == "speaking":
            if self.background * WINDOW_S >= o.background_s > 0:
                return self.end("background")
            if prob >= o.release and not stale:
                paused = self.silence * WINDOW_S >= o.speculate_s
                self.silence = self.since_speech = 0
                self.speech_at = now
                self.last_speech = self.last_speech if background else now  # the speaker's speech, not the room's
                self.drop_check()
                if paused:
                    return TurnEvent("continue")
            else:
                self.silence += 1
                if self.silence == self.windows_of(min(o.end_of_turn.start_s, o.pause_s)):
                    self.start_check()
                if self.silence == self.windows_of(o.speculate_s) and o.speculate_s < o.pause_s:
                    return TurnEvent("pause", np.concatenate(self.windows), self.last_speech)
            reason = self.ending(stale)
            return self.end(reason) if reason else None

        # idle or ended: wait for enough speech to (re)start a turn
        self.speech_run = self.speech_run + 1 if prob >= o.threshold and not stale and not background else 0
        self.heard = self.heard + 1 if prob >= o.threshold else 0  # what the VAD heard, the room's included
        keep = self.preroll_windows + min(self.heard, self.windows_of(1.0))  # an onset the room's level hid
        if self.state == "ended":
            # over: resume_s since the speech stopped, in audio; plus the wall time a client sent nothing (one that
            # only sends while someone talks), beyond a hearing thread's lag. Speech that began within it resumes.
            waited = self.since_speech * WINDOW_S
            unsent = now - self.speech_at - waited
            waited += unsent if unsent > UNSENT_S else 0.0
            if waited > o.resume_s and self.speech_run <= 1:
                self.state = "idle"
                self.windows = self.windows[-keep:]
        else:
            self.windows = self.windows[-keep:]
        if self.speech_run * WINDOW_S >= o.start_s:
            resumed = self.state == "ended"
            self.state = "speaking"
            self.silence = 0
            self.last_speech, self.speech_at, self.since_speech = now, now, 0
            return TurnEvent("resume" if resumed else "speech")
        return None

    def ending(self, stale: bool) -> str | None:
        """Why the turn being spoken ends at this window (`stale`: flat "speech"), or None while it goes on."""
        o, e = self.options, self.options.end_of_turn
        if len(self.windows) * WINDOW_S >= o.max_turn_s:
            return "max_turn"
        if self.silence < self.windows_of(o.pause_s):
            return None
        if stale:
            return "no_new_speech"
        if self.model is None:
            return "pause"
        if self.silence >= self.windows_of(max(e.hold_s, o.pause_s)):
            return "long_pause"
        if self.check is None and self.silence >= self.check_at:
            self.start_check()
        at_pause = self.silence == self.windows_of(o.pause_s)
        if self.check is not None and (at_pause or self.check.done()):
            try:
                self.finished = self.check.result(timeout=e.wait_s if at_pause else 0)
            except FutureTimeout:  # still deciding: hold, and look again at the next window
                return None
            self.check = None
            if self.finished >= e.threshold:
                return "complete"
            self.check_at = self.silence + self.windows_of(e.recheck_s) if e.recheck_s > 0 else 1 << 30
        return None

    def end(self, reason: str) -> TurnEvent:
        turn = np.concatenate(self.windows)
        event = TurnEvent("end", turn, self.last_speech, reason, self.finished)
        logger.debug("turn ended (%s) after %.2f s of silence", reason, self.silence * WINDOW_S)
        if reason == "max_turn":
            logger.info("turn reached %.0f s of speech; replying to it now", self.options.max_turn_s)
            self.windows = []
        self.state = "ended" if reason != "max_turn" else "idle"
        self.silence = 0
        self.speech_run = 0
        self.drop_check()
        return event

    def start_check(self) -> None:
        """Ask the end-of-turn model about the turn so far (its last 8 s), off this thread."""
        if self.model is not None and self.check is None:
            missing = self.options.end_of_turn.tail_s - self.silence * WINDOW_S  # silence still short of its tail
            tail = [np.zeros(round(missing * SAMPLE_RATE), np.float32)] if missing > 0 else []
            self.check = self.model.check(np.concatenate(self.windows[-250:] + tail))  # 250 windows = 8 s, all it reads

    def drop_check(self) -> None:
        if self.check is not None:
            self.check.cancel()
        self.check, self.check_at, self.finished = None, 0, None

    def windows_of(self, seconds: float) -> int:
        return max(1, round(seconds / WINDOW_S))

    @property
    def preroll_windows(self) -> int:
        return max(1, round(self.options.preroll_s / WINDOW_S))
