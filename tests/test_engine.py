"""The engine against plain transformers generate, on the tiny random Voxtral (CPU)."""

import base64
import functools
import threading
import time

import numpy as np
import pytest
import torch

from voxtral_app.audio.pcm import wav_bytes
from voxtral_app.backends.contract import Sampling
from voxtral_app.model import prompt
from voxtral_app.model.decoder import Decoder, bucket, window_for
from voxtral_app.model.engine import EngineOptions
from voxtral_app.model.loading import ModelLoadError, load_engine

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=24)


def reference_tokens(engine, inputs, max_new_tokens):
    """Greedy tokens from transformers' own generate for processor-made inputs."""
    out = engine.model.generate(**inputs.to(engine.device), do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=engine.eos_id, pad_token_id=engine.eos_id)
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[: tokens.index(engine.eos_id)] if engine.eos_id in tokens else tokens


def run(reply) -> str:
    return "".join(reply)


def test_stream_matches_plain_generate(engine, speech):
    chat = engine.open_chat()
    try:
        reply = chat.start(speech, text="What was said?", sampling=GREEDY)
        pieces = list(reply)
    finally:
        chat.close()
    inputs = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio", "base64": base64.b64encode(wav_bytes(speech)).decode()},
                                      {"type": "text", "text": "What was said?"}]}], return_dict=True)
    expected = reference_tokens(engine, inputs, GREEDY.max_new_tokens)
    assert len(expected) > 3
    assert reply.tokens == expected
    assert "".join(pieces) == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert len(pieces) > 1  # streamed piece by piece, not in one go


def pcm16(audio):
    """The processor writes arrays as 16-bit WAV: hand both sides the same 16-bit samples."""
    return np.round(audio * 32768).clip(-32768, 32767).astype(np.float32) / 32768


def test_transcription_matches_plain_generate(engine, speech):
    speech = pcm16(speech)
    chat = engine.open_chat()
    try:
        reply = chat.transcribe(speech, language="en")
        text = run(reply)
        assert chat.messages == []  # transcripts are not part of the conversation
    finally:
        chat.close()
    inputs = engine.processor.apply_transcription_request(language="en", audio=speech, model_id="voxtral",
                                                          sampling_rate=16000, format=["wav"])
    expected = reference_tokens(engine, inputs, engine.options.transcript_tokens)
    assert reply.tokens == expected and 3 < len(expected) <= engine.options.transcript_tokens  # capped by the options
    assert text == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_kv_reuse_matches_reencoding_everything(engine, speech, other_speech):
    chat = engine.open_chat()
    fresh = engine.open_chat()
    try:
        run(chat.start(speech, sampling=GREEDY))
        second = chat.start(other_speech, text="And now?", sampling=GREEDY)
        run(second)
        history = chat.messages[:2]
        assert history[1]["role"] == "assistant"

        fresh.messages = list(history)
        again = fresh.start(other_speech, text="And now?", sampling=GREEDY)
        run(again)
    finally:
        chat.close()
        fresh.close()
    assert second.stats["cached_tokens"] > 375  # turn 1's audio was not encoded again
    assert second.stats["prefill_tokens"] < again.stats["prefill_tokens"]
    assert again.stats["cached_tokens"] == 0
    assert second.tokens == again.tokens and len(second.tokens) > 3


def test_a_reply_joins_the_conversation_as_the_tokens_the_slot_holds(engine, speech, other_speech):
    """The random model's replies do not come back as the same tokens when their text is encoded
    again; the next turn continues the generated tokens, so it prefills only their last token, the
    end of sequence and itself."""
    chat = engine.open_chat()
    try:
        # Most sampled replies encode back to other tokens, one in a few to the same ones; which one comes
        # depends on what earlier tests left in the random generator, so draw until a reply differs.
        for _ in range(10):
            first = chat.start(speech, sampling=Sampling(temperature=1.0, max_new_tokens=40))
            run(first)
            chat.settle()  # the reply joins the conversation
            reply = chat.messages[-1]
            text_ids = engine.processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer.encode(
                reply["content"], bos=False, eos=False)
            if reply["ids"] != text_ids:
                break
            chat.reset()
        assert reply["ids"] == prompt.own_ids(first.tokens, engine.structure) and reply["ids"] != text_ids
        second = chat.start(other_speech, sampling=GREEDY)
        run(second)
        assert second.stats["cached_tokens"] == len(first.prompt_ids) + len(first.generation.fed)
        assert chat.prompt_ids[:second.stats["cached_tokens"]] == first.prompt_ids + first.generation.fed
        assert chat.prompt_ids == prompt.chat_prompt(engine.processor, chat.messages).ids
    finally:
        chat.close()


def test_concurrent_chats_match_running_alone(engine, speech, other_speech):
    alone = []
    for clip in (speech, other_speech):
        chat = engine.open_chat()
        alone.append(chat.start(clip, sampling=GREEDY))
        run(alone[-1])
        chat.close()
    chats = [engine.open_chat() for _ in range(2)]
    together = [chat.start(clip, sampling=GREEDY) for chat, clip in zip(chats, (speech, other_speech))]
    texts = [run(reply) for reply in together]
    for chat in chats:
        chat.close()
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert texts[0] != texts[1]


def test_cancel_stops_generation(engine, speech):
    chat = engine.open_chat()
    reply = chat.start(speech, sampling=Sampling(max_new_tokens=500))
    first = next(iter(reply))
    chat.cancel()
    rest = run(reply)  # what was decoded before the cancel reached the decode thread
    chat.settle()
    assert reply.done and reply.generation.count < 500
    assert first + rest == reply.text and len(reply.tokens) == reply.generation.count  # every token read, once
    assert chat.messages[-1]["role"] == "assistant" and chat.messages[-1]["content"] == reply.text.strip()  # as settled
    chat.close()


def test_long_conversation_drops_oldest_turns(tiny_checkpoint, speech):
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=1, max_tokens=1024, warmup=False))
    chat = engine.open_chat()
    for _ in range(4):  # each turn is ~390 prompt tokens; only two fit with the reply budget
        run(chat.start(speech, sampling=GREEDY))
    users = [m for m in chat.messages if m["role"] == "user"]
    chat.close()
    engine.close()
    assert 1 <= len(users) <= 2


@pytest.mark.slow  # torch.compile on CPU: ~15 s of tracing three graphs
def test_compiled_path_matches_eager(tiny_checkpoint, engine, speech, other_speech, monkeypatch):
    """Compiled prefill (padded to a bucket) and decode give eager's tokens, on a first turn and on a
    second one that extends the slot's cache.

    dynamo captures each graph whole (fullgraph: a graph break fails) with its dynamic shapes and
    guards, and AOTAutograd functionalizes it; the graphs then run without inductor, whose CPU C++
    code runs nowhere in production (compiling is off on the CPU; on CUDA it writes Triton kernels)
    and took 30-40 s more here."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=2048,
                                         compile=True, warmup=False))  # compiles on first use: only what runs here
    assert compiled.decoder.compiled and compiled.decoder.prefill_buckets
    replies = []
    for eng in (compiled, engine):
        chat = eng.open_chat()
        replies.append([])
        for clip in (speech, other_speech):  # each runs to its end first: the first compile can take
            replies[-1].append(chat.start(clip, sampling=GREEDY))  # longer than settle's backstop on a slow machine
            run(replies[-1][-1])
        chat.close()
    compiled.close()
    assert replies[0][1].stats["cached_tokens"] > 0 and len(replies[0][1].tokens) > 3
    assert [r.tokens for r in replies[0]] == [r.tokens for r in replies[1]]


def prefill_both_ways(model, ids, start_ids, features):
    """The same prompt prefilled unpadded and padded to a bucket -> (decoders, logits), eager."""
    decoders, logits = [], []
    for buckets in (None, (64, 128, 512, 1024)):
        decoder = Decoder(model, slots=2, max_tokens=1024, compile=False)
        decoder.prefill_buckets = buckets
        decoder.prefill(1, start_ids, 0, None)
        logits.append(decoder.prefill(1, ids, len(start_ids), features))
        decoders.append(decoder)
    return decoders, logits


def test_padded_prefill_writes_only_the_prompt_into_its_slot(engine, speech):
    prompt_ = prompt.chat_prompt(engine.processor, [prompt.user_message(speech)])
    features = prompt.audio_features(engine.processor.feature_extractor, prompt_.audio, engine.device)
    start_ids = prompt_.ids[:2]  # <s>[INST], before the audio block
    (plain, padded), (expected, got) = prefill_both_ways(engine.model, prompt_.ids[2:], start_ids, features)
    end = len(prompt_.ids)
    assert bucket(end - 2, padded.prefill_buckets) > end - 2  # the test pads
    assert torch.allclose(got, expected, atol=1e-5)
    for layer in range(len(plain.cache.keys)):
        for ours, theirs in ((padded.cache.keys[layer], plain.cache.keys[layer]),
                             (padded.cache.values[layer], plain.cache.values[layer])):
            assert torch.allclose(ours[1, :, :end], theirs[1, :, :end], atol=1e-5)
            assert not ours[1, :, end:].any() and not ours[0].any()  # nothing past the prompt, no other slot
            assert ours[padded.cache.scratch_row].any()  # the padding went to the scratch row


def test_eager_attention_reads_only_the_positions_in_use(engine):
    """Eager (the CPU default), attention reads exactly the tokens so far; compiled code reads a power
    of two (one graph each), and test_compiled_path_matches_eager shows both give the same replies."""
    assert not engine.decoder.compiled
    assert engine.decoder.window(1380) == 1380
    assert window_for(1380, engine.options.max_tokens) == 2048


def test_warm_up_stops_at_its_budget(engine):
    decoder = Decoder(engine.model, slots=4, max_tokens=1024, compile=False, warmup_budget_s=0.0)
    done, total = decoder.warm_up()
    assert done == 1 and total > 10  # the budget is checked before each variant after the first


def test_missing_model_says_how_to_point_at_a_local_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (str(tmp_path / "nowhere"), "mistralai/not-a-real-voxtral"):
        with pytest.raises(ModelLoadError, match="--model"):
            load_engine(EngineOptions(model=model, device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a loadable Voxtral checkpoint"):
        load_engine(EngineOptions(model=str(tmp_path / "empty"), device="cpu"))


def test_sampling_follows_temperature(engine, speech):
    chat = engine.open_chat()
    outputs = set()
    for _ in range(3):
        reply = chat.start(speech, sampling=Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8))
        outputs.add(tuple(list(reply) and reply.tokens))
        chat.reset()
    chat.close()
    assert len(outputs) > 1  # random weights, temperature 1: replies differ


def test_each_turn_prompt_equals_the_reference_encoding(engine, speech, other_speech):
    chat = engine.open_chat()
    try:
        for clip in (speech, other_speech, speech[:16000]):
            reply = chat.start(clip, sampling=Sampling(temperature=1.0, max_new_tokens=12))
            assert chat.prompt_ids == prompt.chat_prompt(engine.processor, chat.messages).ids
            run(reply)
        chat.cancel()
    finally:
        chat.close()


def test_tidy_trims_between_turns_so_the_next_turn_prefills_only_itself(tiny_checkpoint, speech, other_speech):
    """A conversation about to outgrow its cache is trimmed and re-prefilled in the background between
    turns; the next turn then prefills only itself, and says what a fresh chat of the trimmed turns says."""
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=1024, warmup=False))
    chat = engine.open_chat()
    assert not chat.tidy(GREEDY)  # nothing said yet
    clips = [speech[: 5 * 16_000], other_speech, speech[5 * 16_000: 10 * 16_000]]
    run(chat.start(clips[0], sampling=GREEDY))
    assert not chat.tidy(GREEDY)  # one ~400-token turn: room for another
    run(chat.start(clips[1], sampling=GREEDY))
    assert chat.tidy(GREEDY)  # two turns + another would pass 1000 tokens: the oldest goes now
    kept = [dict(m) for m in chat.messages]
    assert [m["role"] for m in kept] == ["user", "assistant"]  # the last turn stays
    reply = chat.start(clips[2], sampling=GREEDY)
    assert chat.prompt_ids == prompt.chat_prompt(engine.processor, chat.messages).ids  # the trim cut, not re-encoded
    run(reply)
    tokens = reply.tokens
    assert reply.stats["cached_tokens"] > 300 and reply.stats["prefill_tokens"] < 450  # only the new turn

    fresh = engine.open_chat()
    fresh.messages = kept
    again = fresh.start(clips[2], sampling=GREEDY)
    run(again)
    assert again.stats["cached_tokens"] <= 1  # the trimmed conversation from scratch
    assert again.tokens == tokens and len(tokens) > 3
    chat.close()
    fresh.close()
    engine.close()


def test_long_prompts_are_prefilled_in_pieces_between_decode_steps(tiny_checkpoint, engine, speech, other_speech):
    """A prompt prefilled 32 tokens at a time (audio split across pieces) gives the same tokens as in
    one go, and the replies in flight keep getting a decode step between its pieces."""
    chunked = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=2, max_tokens=2048,
                                        prefill_chunk=32, later_chunk=32, decode_gap_s=0.0, warmup=False))
    replies = []
    for eng in (chunked, engine):
        chat = eng.open_chat()
        replies.append([])
        for clip in (speech, other_speech):
            replies[-1].append(chat.start(clip, sampling=GREEDY))
            run(replies[-1][-1])
        chat.close()
    assert replies[0][1].stats["cached_tokens"] > 0 and len(replies[0][1].tokens) > 3
    assert [r.tokens for r in replies[0]] == [r.tokens for r in replies[1]]

    talking, listening = chunked.open_chat(), chunked.open_chat()
    reply = talking.start(text="Tell me a long story.", sampling=Sampling(temperature=0.0, top_p=1.0,
                                                                          max_new_tokens=400))
    assert reply.next_piece(timeout=30) is not None  # it is decoding
    before = reply.generation.count
    other = listening.start(speech, sampling=GREEDY)  # ~390 tokens: 13 pieces of 32
    assert other.next_piece(timeout=60) is not None
    assert reply.generation.count - before >= 10, (before, reply.generation.count, reply.done)
    talking.close()
    listening.close()
    chunked.close()


def test_turns_that_end_together_are_prefilled_before_the_next_decode_step(tiny_checkpoint, speech, other_speech):
    """Two turns end while a reply streams: the second one's prefill does not wait for a decode step
    of the replies in flight (they step again at most `decode_gap_s` later)."""
    engine = load_engine(EngineOptions(model=tiny_checkpoint, device="cpu", slots=3, max_tokens=2048,
                                       decode_gap_s=30.0, warmup=False))
    talking, first, second = (engine.open_chat() for _ in range(3))
    calls = []
    prefill, step = engine.decoder.prefill, engine.decoder.step
    first_prefilling, second_ended = threading.Event(), threading.Event()

    def prefilled(slot, *args, **kwargs):
        calls.append(("prefill", slot))
        if slot == first.slot and not first_prefilling.is_set():
            first_prefilling.set()
            assert second_ended.wait(30)  # the second turn ends meanwhile
        return prefill(slot, *args, **kwargs)

    def stepped(rows, *args, **kwargs):
        calls.append(("step", tuple(rows)))
        return step(rows, *args, **kwargs)

    try:
        reply = talking.start(text="Tell me a long story.", sampling=Sampling(temperature=0.0, max_new_tokens=300))
        assert reply.next_piece(timeout=30) is not None and not reply.done  # it is decoding
        engine.decoder.prefill, engine.decoder.step = prefilled, stepped
        replies = [first.start(speech, sampling=GREEDY)]
        assert first_prefilling.wait(30)
        replies.append(second.start(other_speech, sampling=GREEDY))
        second_ended.set()
        for r in replies:
            assert r.next_piece(timeout=60) is not None
        all_three = ("step", (talking.slot, first.slot, second.slot))
        deadline = time.monotonic() + 30
        while all_three not in calls and time.monotonic() < deadline:  # the decode thread's next step
            time.sleep(0.01)
        engine.decoder.prefill, engine.decoder.step = prefill, step
        assert not reply.done
        between = calls[calls.index(("prefill", first.slot)): calls.index(("prefill", second.slot))]
        assert between and not [c for c in between if c[0] == "step"], calls
        assert all_three in calls  # all three go on together
    finally:
        for chat in (talking, first, second):
            chat.close()
        engine.close()
