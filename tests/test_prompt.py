"""Token ids from our prompt code == mistral-common's reference encoding of the same request."""

import base64
import os

import numpy as np
import torch
from mistral_common.protocol.instruct.chunk import AudioChunk, RawAudio, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.transcription.request import TranscriptionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import AutoProcessor

from voxtral_app.audio.pcm import wav_bytes
from voxtral_app.backends.contract import as_text
from voxtral_app.model import prompt
from voxtral_app.model.checkpoint import AUDIO_TOKEN_ID, BEGIN_AUDIO_ID, TRANSCRIBE_ID


def raw_audio(clip):
    return RawAudio(data=base64.b64encode(wav_bytes(clip)).decode(), format="wav")


def test_multi_turn_audio_chat_matches_mistral_common(tiny_checkpoint, speech, other_speech):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [
        prompt.user_message(speech),
        prompt.assistant_message("Hello there."),
        prompt.user_message(other_speech, "And this one?"),
    ]
    ours = prompt.chat_prompt(processor, messages)

    reference = MistralTokenizer.from_file(os.path.join(tiny_checkpoint, "tekken.json")).encode_chat_completion(
        ChatCompletionRequest(messages=[
            UserMessage(content=[AudioChunk(input_audio=raw_audio(speech))]),
            AssistantMessage(content="Hello there."),
            UserMessage(content=[AudioChunk(input_audio=raw_audio(other_speech)), TextChunk(text="And this one?")]),
        ]))
    assert ours.ids == reference.tokens
    # 20.75 s -> one 30 s block (375 tokens); 4 s -> one block
    assert ours.ids.count(BEGIN_AUDIO_ID) == 2
    assert ours.ids.count(AUDIO_TOKEN_ID) == 2 * 375
    assert len(ours.audio) == 2 and all(len(clip) % prompt.CHUNK_SAMPLES == 0 for clip in ours.audio)


def test_a_spoken_turn_aged_into_its_transcript_matches_mistral_common(tiny_checkpoint, speech, other_speech):
    """An old spoken turn becomes a text turn (contract.as_text): the prompt is mistral-common's encoding
    of the conversation with that turn as text, the newer turn still audio."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    messages = [as_text(prompt.user_message(speech, "Listen."), "what was heard"), prompt.assistant_message("Yes."),
                prompt.user_message(other_speech)]
    reference = MistralTokenizer.from_file(os.path.join(tiny_checkpoint, "tekken.json")).encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="what was heard\nListen."), AssistantMessage(content="Yes."),
                                        UserMessage(content=[AudioChunk(input_audio=raw_audio(other_speech))])]))
    assert prompt.chat_prompt(processor, messages).ids == reference.tokens
    assert reference.tokens.count(BEGIN_AUDIO_ID) == 1


def test_transcription_request_matches_mistral_common(tiny_checkpoint, speech):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    tokenizer = MistralTokenizer.from_file(os.path.join(tiny_checkpoint, "tekken.json"))
    for language in ("en", None):
        ours = prompt.transcription_prompt(processor, speech, language, "voxtral")
        reference = tokenizer.encode_transcription(
            TranscriptionRequest(model="voxtral", audio=raw_audio(speech), language=language))
        assert ours.ids == reference.tokens
        assert ours.ids[-1] == TRANSCRIBE_ID
    assert processor.tokenizer.decode(ours.ids[-5:]).endswith("[/INST][TRANSCRIBE]")


def test_audio_features_one_chunk_per_30_seconds(tiny_checkpoint, speech):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    long_clip = prompt.chat_prompt(processor, [prompt.user_message(speech.repeat(2))]).audio[0]  # 41.5 s
    features = prompt.audio_features(processor.feature_extractor, [long_clip], "cpu")
    assert tuple(features.shape) == (2, 128, prompt.CHUNK_FRAMES)


def test_fast_log_mel_equals_the_feature_extractor(tiny_checkpoint, speech):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    for clip in (speech[:16000], speech, speech.repeat(2), np.zeros(100, np.float32)):
        padded = np.pad(clip, (0, -len(clip) % prompt.CHUNK_SAMPLES))
        reference = processor.feature_extractor(padded, sampling_rate=16000, return_tensors="pt", padding=True,
                                                truncation=False, pad_to_multiple_of=prompt.CHUNK_SAMPLES)
        expected = reference["input_features"].reshape(128, -1, prompt.CHUNK_FRAMES).transpose(0, 1)
        assert torch.allclose(prompt.audio_features(processor.feature_extractor, [padded], "cpu"), expected, atol=1e-5)


def test_extending_a_prompt_equals_encoding_the_whole_conversation(tiny_checkpoint, speech, other_speech):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    first = [prompt.user_message(speech[:32000])]
    for reply in ["Hello there.", "two\n\nlines", "1.\n2.\n- item", "ok 🙂 café", "x"]:
        user = prompt.user_message(other_speech, "And now?")
        whole = prompt.chat_prompt(processor, first + [prompt.assistant_message(reply), user])
        extended = prompt.extend_prompt(processor, prompt.chat_prompt(processor, first),
                                        prompt.assistant_message(reply), user)
        assert extended.ids == whole.ids
        assert all(np.array_equal(a, b) for a, b in zip(extended.audio, whole.audio, strict=True))
        assert extended.keys == whole.keys and len(set(whole.keys)) == 2  # each clip hashed when its turn was encoded


def test_a_reply_with_its_own_tokens_is_encoded_as_those_tokens(tiny_checkpoint, speech, other_speech):
    """A reply of the local engine keeps the tokens the model generated: the prompt holds them where
    mistral-common would encode the text, and everything around them is encoded as before."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    encode = processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer.encode
    users = [prompt.user_message(speech[:32000]), prompt.user_message(other_speech, "And now?"),
             prompt.user_message(None, "typed")]
    replies = ["Hello there.", "two\n\nlines"]
    plain = [users[0], prompt.assistant_message(replies[0]), users[1], prompt.assistant_message(replies[1]), users[2]]
    same = [users[0], prompt.assistant_message(replies[0], encode(replies[0], bos=False, eos=False)), users[1],
            prompt.assistant_message(replies[1]), users[2]]
    assert prompt.chat_prompt(processor, same).ids == prompt.chat_prompt(processor, plain).ids  # mistral-common's
    own = [101, 2000, 3000]  # tokens that are not the text's
    mixed = [users[0], prompt.assistant_message(replies[0], own), users[1], prompt.assistant_message(replies[1]),
             users[2]]
    whole = prompt.chat_prompt(processor, mixed)
    head = prompt.chat_prompt(processor, users[:1]).ids
    assert whole.ids[: len(head) + 4] == head + own + [processor.tokenizer.eos_token_id]
    assert whole.ids[len(head) + 4:] == prompt.chat_prompt(processor, plain[2:]).ids[1:]
    assert all(np.array_equal(a, b) for a, b in zip(whole.audio, prompt.chat_prompt(processor, plain).audio, strict=True))
    extended = prompt.extend_prompt(processor, prompt.chat_prompt(processor, mixed[:3]), mixed[3], users[2])
    assert extended.ids == whole.ids
    assert prompt.own_ids([5, 3, 24, 2, 6], {2, 3, 24}) == [5, 6]  # no [INST], [AUDIO] or </s> from a reply
    # a long conversation of short typed turns (over 1000 of them fit the cache) encodes in one pass
    long = [m for i in range(1200) for m in (prompt.user_message(None, f"t{i}"), prompt.assistant_message("r", [81]))]
    ids = prompt.chat_prompt(processor, long + [users[2]]).ids
    assert ids.count(81) == 1200 and ids.count(processor.tokenizer.eos_token_id) == 1200


def test_dropping_the_oldest_turns_equals_encoding_the_turns_that_stay(tiny_checkpoint, speech, other_speech):
    """A trim cuts the conversation's prompt at an [INST] instead of encoding what stays again."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    inst, begin_audio = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("[INST]", "[BEGIN_AUDIO]"))
    messages = []
    for i, reply in enumerate(["Hello there.", "two\n\nlines", "ok 🙂 café"]):
        user = prompt.user_message(speech[:32000] if i % 2 else other_speech, "typed too" if i == 1 else "")
        messages += [user, prompt.assistant_message(reply)]
    messages.append(prompt.user_message(None, "and a typed turn"))
    whole = prompt.chat_prompt(processor, messages)
    for turns in range(4):
        cut = prompt.drop_turns(whole, inst, begin_audio, turns)
        encoded = prompt.chat_prompt(processor, messages[2 * turns:])
        assert cut.ids == encoded.ids and cut.keys == encoded.keys
        assert all(np.array_equal(a, b) for a, b in zip(cut.audio, encoded.audio, strict=True))
    assert prompt.turns_to_drop(whole.ids, inst, len(whole.ids)) == 0
    assert prompt.turns_to_drop(whole.ids, inst, 1) == 3  # never the last turn
    target = len(prompt.chat_prompt(processor, messages[4:]).ids)
    assert prompt.turns_to_drop(whole.ids, inst, target) == 2
