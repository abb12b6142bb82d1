"""Spoken replies: streamed text -> sentences -> audio, so a caller hears sentence one while the rest is generated.

`SentenceSplitter` cuts streamed text pieces into speakable sentences (markdown stripped).
`load_speaker` picks Kokoro (neural, 24 kHz) when it is installed and its weights load offline, and
otherwise espeak-ng (22.05 kHz), which always works offline. The conversation feeds one into the other as a reply streams.
"""

import io
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile

logger = logging.getLogger(__name__)

# A sentence ends at . ! ? or … (plus any closing quotes/brackets) once whitespace follows, or at a newline.
# "End of text" only counts in flush(): mid-stream, "3." may still become "3.5".
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n")
# Words whose "." is not a sentence end. Not "no" or "etc": those often do end a sentence.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "approx", "dept", "est",
                           "fig", "inc", "ltd", "vol", "cf", "al"})
DOTTED_LETTERS = re.compile(r"(?:[a-z]\.)+[a-z]")  # "e.g", "i.e", "u.s.a" before their last "."
MAX_SENTENCE_CHARS = 200  # ~12 s of speech: a run-on sentence is cut here so audio never waits forever
MIN_CLAUSE_CHARS = 40  # a comma earlier than this makes a choppy cut; cut at the last space instead

MARKDOWN_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")  # [text](url) -> text
MARKDOWN_SYMBOLS = re.compile(r"[*#`]+")
LINE_MARKER = re.compile(r"^\s*(?:[-+•>]\s+)+")  # bullets and quote markers at a line's start


def strip_markdown(text: str) -> str:
    """Markdown as an LLM writes it -> plain words for a voice."""
    text = MARKDOWN_LINK.sub(r"\1", text)
    text = MARKDOWN_SYMBOLS.sub("", text)
    text = LINE_MARKER.sub("", text)
    return " ".join(text.split())


def _is_abbreviation(before: str) -> bool:
    """Whether the "." after `before` belongs to a word (Dr., e.g., J., a "1." list marker)."""
    words = before.split()
    if not words:
        return False
    word = words[-1].lstrip("([\"'“‘").lower()
    if word in ABBREVIATIONS or DOTTED_LETTERS.fullmatch(word):  # "dr", "e.g", "u.s" (but not "3.5")
        return True
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
        return True
    return len(words) == 1 and word.isdigit()  # "1. First item": a list number, not a sentence


class SentenceSplitter:
    """Streamed text pieces -> complete sentences, ready to speak. One per turn, or flush() between turns."""

    def __init__(self):
        self.buffer = ""

    def push(self, piece: str) -> list[str]:
        self.buffer += piece
        sentences = []
        pos = 0
        while (match := SENTENCE_END.search(self.buffer, pos)) is not None:
            if match.group() == "." and _is_abbreviation(self.buffer[:match.start()]):
                pos = match.end()
                continue
            sentences += self._take(match.end())
            pos = 0
        while len(self.buffer) > MAX_SENTENCE_CHARS:
            sentences += self._take(self._run_on_cut())
        return sentences

    def flush(self) -> list[str]:
        """Whatever is left at the end of the reply, as the last sentence (if it has any words)."""
        return self._take(len(self.buffer))

    def _take(self, end: int) -> list[str]:
        sentence, self.buffer = strip_markdown(self.buffer[:end]), self.buffer[end:]
        return [sentence] if re.search(r"\w", sentence) else []  # drop "---", "```", stray "..."

    def _run_on_cut(self) -> int:
        window = self.buffer[:MAX_SENTENCE_CHARS]
        cut = max(window.rfind(", "), window.rfind("; "), window.rfind(": ")) + 1  # keep the comma
        if cut < MIN_CLAUSE_CHARS:
            cut = window.rfind(" ")
        return cut if cut > 0 else MAX_SENTENCE_CHARS  # one 200-char "word": cut it anyway


@dataclass(frozen=True)
class VoiceOptions:
    engine: str = "auto"  # "auto" and "kokoro" try Kokoro then fall back to espeak-ng; "espeak" skips Kokoro
    voice: str = "en-us"  # espeak-ng voice (`espeak-ng --voices` lists them)
    words_per_minute: int = 175  # espeak-ng's own default; Kokoro's speed is scaled by words_per_minute / 175
    kokoro_voice: str = "af_heart"  # Kokoro voice; its first letter is the language ("a" = American English)


class Speaker:
    """Text -> (sample rate, float32 mono samples in [-1, 1]). Subclasses render one engine."""

    engine = "none"
    sample_rate = 0

    def synthesize(self, text: str) -> tuple[int, np.ndarray]:
        if not text.strip():
            return self.sample_rate, np.zeros(0, dtype=np.float32)
        samples = np.asarray(self.render(text), dtype=np.float32).reshape(-1)
        return self.sample_rate, np.clip(samples, -1.0, 1.0)

    def render(self, text: str) -> np.ndarray:
        raise NotImplementedError


ESPEAK_TIMEOUT_S = 10  # a sentence renders in ~20 ms; a hung process must not hang the call


class EspeakSpeaker(Speaker):
    """espeak-ng in a subprocess: text on stdin (no shell, no argument parsing), WAV on stdout."""

    engine = "espeak"
    sample_rate = 22_050  # espeak-ng's fixed output rate

    def __init__(self, voice: str, words_per_minute: int):
        self.program = shutil.which("espeak-ng")
        if self.program is None:
            raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng")
        self.command = [self.program, "-v", voice, "-s", str(words_per_minute), "-b", "1", "--stdout", "--stdin"]

    def render(self, text: str) -> np.ndarray:
        done = subprocess.run(self.command, input=text.encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S, check=False)
        if done.returncode != 0 or not done.stdout:
            raise RuntimeError(f"espeak-ng failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")
        samples, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32")
        if rate != self.sample_rate:
            raise RuntimeError(f"espeak-ng wrote {rate} Hz audio, expected {self.sample_rate} Hz")
        return samples if samples.ndim == 1 else samples.mean(axis=1)


class KokoroSpeaker(Speaker):
    """Kokoro-82M through the kokoro package's KPipeline (optional; not in requirements.txt)."""

    engine = "kokoro"
    sample_rate = 24_000  # Kokoro's fixed output rate

    def __init__(self, voice: str, words_per_minute: int):
        from kokoro import KPipeline

        self.pipeline = KPipeline(lang_code=voice[0], repo_id="hexgrad/Kokoro-82M")
        self.voice = voice
        self.speed = words_per_minute / 175

    def render(self, text: str) -> np.ndarray:
        chunks = [np.asarray(audio, dtype=np.float32).reshape(-1)  # CPU tensors, one per line of text
                  for _, _, audio in self.pipeline(text, voice=self.voice, speed=self.speed) if audio is not None]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


def load_speaker(options: VoiceOptions) -> Speaker:
    """The best engine that works here, warmed up with one word (so a bad voice fails now, not mid-call)."""
    if options.engine not in ("auto", "kokoro", "espeak"):
        raise ValueError(f"unknown TTS engine {options.engine!r}: use auto, kokoro or espeak")
    if options.engine in ("auto", "kokoro"):
        try:
            speaker = KokoroSpeaker(options.kokoro_voice, options.words_per_minute)
            speaker.synthesize("Ready.")  # loads the voice file too, which may be missing offline
            logger.info("tts: kokoro voice %s", options.kokoro_voice)
            return speaker
        except Exception as error:  # noqa: BLE001
            # not installed, weights not cached while offline, no espeak for its G2P, ...: all mean espeak-ng.
            # A warning only if Kokoro was asked for: "auto" without it (the default install) is no fault.
            logger.log(logging.WARNING if options.engine == "kokoro" else logging.DEBUG,
                       "tts: kokoro unavailable (%s: %s); using espeak-ng", type(error).__name__, error)
    speaker = EspeakSpeaker(options.voice, options.words_per_minute)
    speaker.synthesize("Ready.")
    logger.info("tts: espeak-ng voice %s at %s wpm", options.voice, options.words_per_minute)
    return speaker


def load_speaker_or_none(options: VoiceOptions) -> Speaker | None:
    """Spoken replies are optional: with no working TTS the app serves text, after one warning."""
    try:
        return load_speaker(options)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        logger.warning("spoken replies are off: %s", error)
        return None
