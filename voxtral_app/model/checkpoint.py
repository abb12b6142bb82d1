"""Voxtral checkpoints that need no download: a tiny random one for tests, CI and offline demos,
and the full Voxtral-Mini-3B-2507 architecture with random weights for GPU benchmarks.

Both use the real transformers classes. The tokenizer is a real Tekken tokenizer built from
mistral-common's bundled vocabulary, with Voxtral's special tokens and audio settings, so the
processor's token ids match mistral-common's reference encoding exactly.
"""

import json
import os
from importlib.resources import files

import torch

TINY = "tiny-random"  # `--model tiny-random` builds (once) and serves the tiny checkpoint
AUDIO_TOKEN_ID = 24  # [AUDIO]
BEGIN_AUDIO_ID = 25  # [BEGIN_AUDIO]
TRANSCRIBE_ID = 34  # [TRANSCRIBE]
SPECIAL_TOKENS = 1000  # Tekken v7 reserves ids 0-999 for control tokens
FULL_SIZE_CONFIG = files(__package__).joinpath("voxtral-mini-3b-2507.json")  # shipped inside the package
# What transformers loads from a hub repo: configs, processor/tokenizer files (tekken.json) and the
# transformers weights (model.safetensors or model-0000X-of-0000N.safetensors + their index). The
# Voxtral repos also hold Mistral's own consolidated.safetensors, the same weights again (~9.4 GB).
HUB_FILES = ("*.json", "model*.safetensors")


def tekken_json() -> dict:
    """mistral-common's bundled Tekken vocabulary, made into Voxtral's v7 audio tokenizer."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads(files("mistral_common").joinpath("data/tekken_240911.json").read_text())
    data["config"]["version"] = "v7"
    named = {t["rank"]: getattr(t["token_str"], "value", t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
    named.update({AUDIO_TOKEN_ID: "[AUDIO]", BEGIN_AUDIO_ID: "[BEGIN_AUDIO]", TRANSCRIBE_ID: "[TRANSCRIBE]"})
    data["special_tokens"] = [{"rank": rank, "token_str": named.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
                              for rank in range(SPECIAL_TOKENS)]
    data["config"]["default_num_special_tokens"] = SPECIAL_TOKENS
    data["audio"] = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
                     "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}
    return data


def save_processor(path: str) -> None:
    from transformers import (
        MistralCommonBackend,
        VoxtralProcessor,
        WhisperFeatureExtractor,
    )

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tekken.json"), "w") as f:
        json.dump(tekken_json(), f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:  # without config.json, AutoTokenizer
        json.dump({"tokenizer_class": "MistralCommonBackend"}, f)  # would not pick mistral-common
    tokenizer = MistralCommonBackend.from_pretrained(path)
    processor = VoxtralProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer)
    processor.save_pretrained(path)


def tiny_config():
    from transformers import VoxtralConfig

    return VoxtralConfig(
        audio_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=131072,
                         max_position_embeddings=32768, initializer_range=0.2),  # wide logits: stable greedy
        audio_token_id=AUDIO_TOKEN_ID,
    )


def full_size_config():
    """Voxtral-Mini-3B-2507's architecture (voxtral-mini-3b-2507.json beside this module: its config.json)."""
    from transformers import VoxtralConfig

    return VoxtralConfig.from_dict(json.loads(FULL_SIZE_CONFIG.read_text()))


def random_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    from transformers import VoxtralForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = VoxtralForConditionalGeneration(config).to(dtype)
    return model.eval()


def build_tiny(path: str) -> str:
    """Write the tiny random checkpoint (model + processor) to `path` once; -> path."""
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        save_processor(path)
        random_model(tiny_config()).save_pretrained(path)
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(path: str, device: torch.device):
    """The Voxtral model from a checkpoint directory, on `device` (bfloat16 on CUDA), in eval mode."""
    from transformers import VoxtralForConditionalGeneration

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = VoxtralForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device)
    return model.eval()
