"""Prompts: a conversation or a transcription request -> Voxtral token ids and audio features.

Token ids come from the model's own tokenizer (mistral-common, through the transformers
processor), so they are exactly mistral-common's reference encoding. Each audio clip becomes one
[BEGIN_AUDIO] block of 375 [AUDIO] tokens per started 30 s; its log-mel features come from the
processor's feature extractor, one [mels, 3000] chunk per 30 s.
"""

import base64
from dataclasses import dataclass

import numpy as np
import torch
from mistral_common.protocol.transcription.request import TranscriptionRequest

from .audio import SAMPLE_RATE, wav_bytes

CHUNK_SAMPLES = 480_000  # 30 s at 16 kHz: Voxtral pads every clip to a multiple of this
CHUNK_FRAMES = 3_000  # mel frames per 30 s chunk (the encoder's fixed input length)


@dataclass
class Prompt:
    ids: list[int]
    audio: list[np.ndarray]  # one padded 16 kHz clip per [BEGIN_AUDIO] block, in order


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


def assistant_message(text: str) -> dict:
    return {"role": "assistant", "content": text}


def chat_prompt(processor, messages: list[dict]) -> Prompt:
    """Whole conversation (ending with a user turn) -> ids ready for the assistant's reply."""
    encoded = processor.tokenizer.apply_chat_template(messages, return_dict=True)
    return Prompt(ids=list(encoded["input_ids"]), audio=list(encoded.get("audio") or []))


def transcription_prompt(processor, audio: np.ndarray, language: str | None, model_id: str) -> Prompt:
    """Transcription request ("lang:xx[TRANSCRIBE]"; no language means auto-detect) -> ids."""
    request = TranscriptionRequest(model=model_id, audio=base64.b64encode(wav_bytes(audio)).decode(),
                                   language=language or None)
    encoded = processor.tokenizer.tokenizer.encode_transcription(request)
    return Prompt(ids=list(encoded.tokens), audio=[clip.audio_array for clip in encoded.audios])


def audio_features(processor, clips: list[np.ndarray], device: torch.device) -> torch.Tensor | None:
    """Padded clips -> [chunks, mels, 3000] log-mel features, the way VoxtralProcessor makes them."""
    if not clips:
        return None
    chunks = []
    for clip in clips:
        features = processor.feature_extractor(
            clip, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True, truncation=False,
            pad_to_multiple_of=CHUNK_SAMPLES, device=str(device))["input_features"]  # [1, mels, frames]
        chunks.append(features.reshape(features.shape[1], -1, CHUNK_FRAMES).transpose(0, 1))
    return torch.cat(chunks).to(device)


def audio_block_starts(ids: list[int], begin_audio_id: int) -> list[int]:
    """Positions of the [BEGIN_AUDIO] tokens, one per clip."""
    return [i for i, token in enumerate(ids) if token == begin_audio_id]
