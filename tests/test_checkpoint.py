"""A checkpoint laid out like the hub repo mistralai/Voxtral-Mini-3B-2507, and what the app downloads of it."""

import json
import os
import re
import shlex

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from voxtral_app.backends.contract import Sampling
from voxtral_app.model import checkpoint
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import load_engine


def hub_like_checkpoint(path: str) -> list[str]:
    """The tiny model as the hub repo lays out the real one -> its files, relative to `path`."""
    checkpoint.save_processor(path)  # tekken.json, tokenizer/processor configs
    model = checkpoint.random_model(checkpoint.tiny_config())
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(path, max_shard_size=size * 3 // 5)  # two shards + model.safetensors.index.json
    with open(os.path.join(path, "params.json"), "w") as f:  # Mistral's own config, beside transformers'
        json.dump({"dim": 64, "n_layers": 2}, f)
    with open(os.path.join(path, "consolidated.safetensors"), "wb") as f:  # Mistral's copy of the weights
        f.write(b"\0" * 1024)
    return sorted(os.listdir(path))


def test_hub_files_keep_the_transformers_shards_and_drop_consolidated(tmp_path):
    files = hub_like_checkpoint(str(tmp_path))
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "consolidated.safetensors", "params.json", "tekken.json"} <= set(files)
    kept = set(filter_repo_objects(files, allow_patterns=list(checkpoint.HUB_FILES)))  # as snapshot_download does
    assert kept == set(files) - {"consolidated.safetensors"}
    assert set(filter_repo_objects(["model.safetensors"], allow_patterns=list(checkpoint.HUB_FILES)))  # unsharded

    engine = load_engine(EngineOptions(model=str(tmp_path), device="cpu", slots=1, max_tokens=512, warmup=False))
    try:
        reference = checkpoint.random_model(checkpoint.tiny_config()).state_dict()  # the same seed
        loaded = engine.model.state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[name], reference[name]) for name in reference)
        chat = engine.open_chat()
        reply = chat.start(text="Hello", sampling=Sampling(temperature=0.0, top_p=1.0, max_new_tokens=4))
        "".join(reply)
        assert reply.generation.count == 4 and reply.generation.error is None
        chat.close()
    finally:
        engine.close()



def test_the_offline_error_gives_the_filtered_download_command(monkeypatch, tmp_path):
    """Offline with nothing cached, the default model fails with the `hf download` command that fetches exactly
    HUB_FILES (~9.4 GB, not the repo's ~19 GB) and the way to run with no download at all."""
    from huggingface_hub import constants

    from voxtral_app.model.engine import DEFAULT_MODEL
    from voxtral_app.model.loading import ModelLoadError, checkpoint_path

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, as HF_HUB_CACHE sets it
    with pytest.raises(ModelLoadError) as failed:
        checkpoint_path(DEFAULT_MODEL)
    message = str(failed.value)
    command = shlex.split(re.search(r"`(hf download [^`]+)`", message).group(1))
    assert command[:3] == ["hf", "download", DEFAULT_MODEL]
    includes = [command[i + 1] for i, word in enumerate(command) if word == "--include"]
    assert includes == list(checkpoint.HUB_FILES)
    assert command[command.index("--local-dir") + 1] == "models/voxtral" and "`--model models/voxtral`" in message
    assert "`--model tiny-random`" in message
