"""Prompts: a conversation or a transcription request -> Voxtral token ids and audio features.

Token ids come from the model's own tokenizer (mistral-common, through the transformers
processor), so they are exactly mistral-common's reference encoding, except that a reply the local
engine generated keeps the tokens it was generated as (`assistant_message(text, ids)`). Each audio clip becomes one
[BEGIN_AUDIO] block of 375 [AUDIO] tokens per started 30 s; its log-mel features come from the
processor's feature extractor, one [mels, 3000] chunk per 30 s.
"""

import base64
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from mistral_common.protocol.transcription.request import TranscriptionRequest

from ..audio.pcm import SAMPLE_RATE, wav_bytes
from ..compat.transformers import text_tokens

CHUNK_SAMPLES = 480_000  # 30 s at 16 kHz: Voxtral pads every clip to a multiple of this
CHUNK_FRAMES = 3_000  # mel frames per 30 s chunk (the encoder's fixed input length)


@dataclass
class Prompt:
    ids: list[int]
    audio: list[np.ndarray]  # one padded 16 kHz clip per [BEGIN_AUDIO] block, in order
    keys: list[str]  # clip_key of each clip: hashed once, when its turn was encoded


def clip_key(clip: np.ndarray) -> str:
    """What a clip sounds like, as a short hash: equal keys, equal audio (and equal encoder output)."""
    return hashlib.blake2b(clip.tobytes(), digest_size=16).hexdigest()


def with_keys(ids: list[int], audio: list[np.ndarray]) -> Prompt:
    return Prompt(ids, audio, [clip_key(clip) for clip in audio])


def user_message(audio: np.ndarray | None = None, text: str = "") -> dict:
    """A user turn in the transformers chat format (audio travels as a lossless WAV)."""
    content = []
    if audio is not None:
        content.append({"type": "audio", "base64": base64.b64encode(wav_bytes(audio)).decode()})
    if text:
        content.append({"type": "text", "text": text})
    if not content:
        raise ValueError("a user turn needs audio or text")
    return {"role": "user", "content": content}


def assistant_message(text: str, ids: list[int] | None = None) -> dict:
    """A reply in the transformers chat format. `ids`: the tokens the model generated for it (a reply
    of the local engine); its prompt then holds those tokens, not the text encoded again, which
    need not give the same tokens (and the slot's cache holds the generated ones)."""
    message = {"role": "assistant", "content": text}
    if ids is not None:
        message["ids"] = ids
    return message


def chat_prompt(processor, messages: list[dict]) -> Prompt:
    """Whole conversation (ending with a user turn) -> ids ready for the assistant's reply.
    Without replies of the model's own tokens, this is mistral-common's encoding (tests prove it).
    Each such reply is placed as its tokens; mistral-common encodes the turns between them (it
    encodes turn by turn, so the pieces joined equal the whole)."""
    prompt, start = None, 0
    for k in [k for k, message in enumerate(messages) if "ids" in message] + [len(messages)]:
        if k > start:
            encoded = processor.tokenizer.apply_chat_template(messages[start:k], return_dict=True)
            turns = with_keys(list(encoded["input_ids"]), list(encoded.get("audio") or []))
            prompt = turns if prompt is None else then(prompt, turns)
        if k < len(messages):
            prompt = with_reply(processor, prompt, messages[k])
        start = k + 1
    return prompt


def with_reply(processor, prompt: Prompt, reply: dict) -> Prompt:
    """A conversation's prompt followed by its reply (an assistant message) and the end of sequence,
    as mistral-common encodes an assistant turn (the engine stores replies stripped), or the reply's
    own tokens when it has them."""
    tokenizer = processor.tokenizer
    reply_ids = reply["ids"] if "ids" in reply else text_tokens(processor, reply["content"])
    return Prompt(prompt.ids + reply_ids + [tokenizer.eos_token_id], prompt.audio, prompt.keys)


def extend_prompt(processor, prompt: Prompt, reply: dict, user: dict) -> Prompt:
    """The prompt of a conversation -> the prompt after its reply and one more user turn.

    mistral-common encodes a conversation turn by turn, so this equals `chat_prompt` of the whole
    (tests prove it) for replies without surrounding whitespace (the engine stores them stripped).
    """
    return then(with_reply(processor, prompt, reply), chat_prompt(processor, [user]))


def then(closed: Prompt, turns: Prompt) -> Prompt:
    """A conversation's prompt that ends with a reply, followed by the encoding of the turns after it
    (their <s> dropped): mistral-common encodes turn by turn."""
    return Prompt(closed.ids + turns.ids[1:], closed.audio + turns.audio, closed.keys + turns.keys)


STRUCTURE = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[BEGIN_AUDIO]", "[AUDIO]", "[TRANSCRIBE]")


def own_ids(tokens: list[int], structure: set[int]) -> list[int]:
    """A generated reply's tokens as its turn keeps them: all but those that give a prompt its shape
    (STRUCTURE's ids: a reply cannot open a turn or an audio block; the text leaves them out too)."""
    return [token for token in tokens if token not in structure]


def transcription_prompt(processor, audio: np.ndarray, language: str | None, model_id: str) -> Prompt:
    """Transcription request ("lang:xx[TRANSCRIBE]"; no language means auto-detect) -> ids."""
    request = TranscriptionRequest(model=model_id, audio=base64.b64encode(wav_bytes(audio)).decode(),
                                   language=language or None)
    encoded = processor.tokenizer.tokenizer.encode_transcription(request)
    return with_keys(list(encoded.tokens), [clip.audio_array for clip in encoded.audios])


def audio_features(extractor, clips: list[np.ndarray], device: torch.device) -> torch.Tensor | None:
    """Padded clips -> [chunks, mels, 3000] log-mel features, equal to VoxtralProcessor's
    (`extractor`: its feature_extractor)."""
    if not clips:
        return None
    return torch.cat([log_mel(extractor, clip) for clip in clips]).to(device)


def log_mel(extractor, clip: np.ndarray) -> torch.Tensor:
    """One clip padded to a multiple of 30 s -> [chunks, mels, 3000], as Whisper's extractor makes it,
    but with the STFT run over the sound only: the zero padding's frames are a known constant
    (log10 of the 1e-10 floor = -10), so a short turn costs a short STFT, not 30 s of one."""
    if getattr(extractor, "dither", 0.0) or len(clip) % CHUNK_SAMPLES:
        features = extractor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True, truncation=False,
                             pad_to_multiple_of=CHUNK_SAMPLES)["input_features"]  # [1, mels, frames]
        return features.reshape(features.shape[1], -1, CHUNK_FRAMES).transpose(0, 1)
    used = min(len(clip), max(len(sound(clip)), 1) + extractor.n_fft)  # + one window of zeros
    stft = torch.stft(torch.from_numpy(np.ascontiguousarray(clip[:used], dtype=np.float32)), extractor.n_fft,
                      extractor.hop_length, window=torch.hann_window(extractor.n_fft), return_complex=True)
    mel = torch.from_numpy(extractor.mel_filters).float().T @ (stft[..., :-1].abs() ** 2)  # [mels, frames used]
    frames = len(clip) // extractor.hop_length
    log = torch.full((mel.shape[0], frames), -10.0)
    log[:, : min(frames, mel.shape[1])] = mel.clamp(min=1e-10).log10()[:, :frames]
    log = (torch.maximum(log, log.max() - 8.0) + 4.0) / 4.0
    return log.reshape(log.shape[0], -1, CHUNK_FRAMES).transpose(0, 1)


def sound(clip: np.ndarray) -> np.ndarray:
    """A padded clip without its trailing zeros (Voxtral's padding to 30 s)."""
    nonzero = np.flatnonzero(clip)
    return clip[: nonzero[-1] + 1 if len(nonzero) else 0]


def turns_to_drop(ids: list[int], inst_id: int, target: int) -> int:
    """How many of a conversation's oldest turns to drop so that its prompt `ids` has at most `target`
    tokens; each user turn begins with [INST], and the last turn always stays."""
    starts = positions(ids, inst_id)
    return next((k for k, start in enumerate(starts) if 1 + len(ids) - start <= target), max(len(starts) - 1, 0))


def drop_turns(prompt: Prompt, inst_id: int, begin_audio_id: int, turns: int) -> Prompt:
    """A conversation's prompt -> the prompt of the conversation without its `turns` oldest turns.
    mistral-common encodes turn by turn, so that is <s> and the rest from the next turn's [INST], with
    the clips that come after it: nothing is encoded again (tests prove it equals `chat_prompt`)."""
    if turns <= 0:
        return prompt
    cut = positions(prompt.ids, inst_id)[turns]
    clips = sum(start < cut for start in positions(prompt.ids, begin_audio_id))
    return Prompt(prompt.ids[:1] + prompt.ids[cut:], prompt.audio[clips:], prompt.keys[clips:])


def positions(ids: list[int], token_id: int) -> list[int]:
    """Where `token_id` occurs in `ids`."""
    return [i for i, token in enumerate(ids) if token == token_id]


def audio_block_starts(ids: list[int], begin_audio_id: int) -> list[int]:
    """Positions of the [BEGIN_AUDIO] tokens, one per clip."""
    return positions(ids, begin_audio_id)
