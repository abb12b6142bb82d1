"""The hot path: audio encoding, prompt prefill and a small fixed-shape decode step.

Each conversation's keys and values live in one row ("slot") of a static KV cache while it has one
(rows.py moves idle conversations to host memory and back), so a new turn only prefills what is new.
Decoding runs one step for all conversations that are generating at once (batched), reading each
row's cache up to a bucketed window rather than its full length. The step samples on the device and
is the unit that torch.compile (CUDA graphs on GPU) sees; the eager path runs the very same code, so
CPU tests cover it. Compiled, the prefill runs too, its prompt padded to one of a few lengths
(`prefill_buckets`), the padding written to the scratch row.

Attention reads a slot's cache in place (a view) wherever the rows of a step are one contiguous
run of slots: every prefill (one row), every batch-1 step, and batches whose slots are adjacent
(a full server). Only a batch of scattered slots gathers its rows' windows into a copy.
"""

import logging
import time

import numpy as np
import torch

from ..compat.transformers import (
    allow_recompiles,
    cache_argument,
    language_model,
    mark_static,
)
from . import prompt as prompts

logger = logging.getLogger(__name__)

MIN_WINDOW = 256  # tokens; smallest attention window a decode step reads
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode batches are padded up to one of these sizes
TOP_CANDIDATES = 1024  # tokens considered when sampling; at Voxtral's temperature 0.2 the rest is ~0 mass
PREFILL_STEP = 256  # tokens; compiled prefills are padded to a power of two below this, a multiple above
ROW_OFFSET = 1_000_003  # added to a row index passed to compiled code: an int that is never 0, 1 or a size
WARMUP_BUDGET_S = 120.0  # start-up compilation / CUDA-graph capture stops here; the rest compiles on first use


def prefill_buckets(max_tokens: int) -> tuple[int, ...]:
    """Prompt lengths a compiled prefill is padded to: 16, 32, ..., 256, 512, 768, ..., max_tokens."""
    small = tuple(2 ** i for i in range(4, PREFILL_STEP.bit_length() - 1) if 2 ** i < max_tokens)
    return small + tuple(range(PREFILL_STEP, max_tokens, PREFILL_STEP)) + (max_tokens,)


class SlotCache:
    """Static KV cache, one row per conversation: [slots + 1, kv_heads, max_tokens, head_dim] per layer.

    It quacks like a transformers Cache for the Llama decoder: `route()` says which rows and
    positions the next forward writes, `update()` writes there in place and returns the read rows'
    first `window` positions: a view of B rows from `first_row` on when the caller says they are
    contiguous, else a gathered copy. The extra last row is scratch for padded batch rows and
    padded prompt positions. Owned by the decode thread, like the Decoder.
    """

    def __init__(self, config, slots: int, max_tokens: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots + 1, config.num_key_value_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        for tensor in self.keys + self.values:
            mark_static(tensor)  # updated in place: no copies under CUDA graphs
        self.scratch_row = slots
        self.max_tokens = max_tokens
        self.route(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 1, ROW_OFFSET)

    def route(self, rows: torch.Tensor, positions: torch.Tensor, window: int, first_row: int | None) -> None:
        """The next forward writes key/value [b, :, q] to row rows[b, q] (or rows[b, 0]) at positions[b, q],
        and reads positions [0, window) of rows first_row - ROW_OFFSET onwards (contiguous rows) or of
        rows[:, 0] (scattered, first_row None). The offset keeps dynamo from specialising rows 0 and 1."""
        self.rows = rows  # [B, Q] or [B, 1]
        self.positions = positions  # [B, Q]
        self.window = window
        self.first_row = first_row

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [B, kv_heads, Q, head_dim]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key.transpose(1, 2)  # indexed view is [B, Q, kv_heads, head_dim]
        values[self.rows, :, self.positions] = value.transpose(1, 2)
        if self.first_row is not None:
            first = self.first_row - ROW_OFFSET
            rows = slice(first, first + key.shape[0])
            return keys[rows, :, : self.window], values[rows, :, : self.window]  # views: nothing copied
        return keys[self.rows[:, 0], :, : self.window], values[self.rows[:, 0], :, : self.window]


class HostRows:
    """One conversation's keys and values copied off its row: [2 * layers, kv_heads, length, head_dim]
    (keys, then values), pinned on CUDA so the copies run asynchronously."""

    def __init__(self, data: torch.Tensor, length: int):
        self.data = data
        self.length = length  # tokens
        self.nbytes = data.numel() * data.element_size()


def causal_mask(positions: torch.Tensor, window: int) -> torch.Tensor:
    """[B, Q] query positions -> [B, 1, Q, window] bool mask: each query sees keys up to itself."""
    keys = torch.arange(window, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: nucleus sampling per row, greedy where temperature is 0.

    Only the TOP_CANDIDATES likeliest tokens compete (a top-k instead of sorting 131k), and the
    draw is an exponential race instead of multinomial: no host sync, CUDA-graph friendly.
    """
    top_logits, top_ids = logits.float().topk(min(TOP_CANDIDATES, logits.shape[-1]), dim=-1)  # sorted
    probs = torch.softmax(top_logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs * (mass_before < top_p[:, None])  # the top token always stays
    race = probs / torch.empty_like(probs).exponential_(1.0)
    sampled = top_ids.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, sampled, top_ids[:, 0])


def bucket(n: int, sizes) -> int:
    return next(size for size in sizes if size >= n)


def window_for(length: int, max_tokens: int) -> int:
    """Attention window for a step whose longest row has `length` tokens: a power of two."""
    window = MIN_WINDOW
    while window < length:
        window *= 2
    return min(window, max_tokens)


class Decoder:
    """Runs Voxtral's audio encoder, prefill and batched decode steps on one SlotCache.

    Owned by the engine's decode thread (CUDA graphs are recorded per thread)."""

    def __init__(self, model, slots: int, max_tokens: int, compile: bool | None,
                 warmup_budget_s: float = WARMUP_BUDGET_S, extractor=None):
        """`compile`: torch.compile the hot path; None: on with CUDA, off on the CPU. `extractor`: the
        processor's WhisperFeatureExtractor, for `encode_clips` (log-mel features made where the model is)."""
        self.model = model
        self.extractor = extractor
        self.device = model.device
        compile = compile if compile is not None else self.device.type == "cuda"
        self.text = language_model(model)  # the Llama decoder
        self.cache_argument = cache_argument(self.text)
        self.embed = self.text.get_input_embeddings()
        self.audio_token_id = model.config.audio_token_id
        self.cache = SlotCache(model.config.text_config, slots, max_tokens, model.dtype, self.device)
        self.slots = slots
        self.max_tokens = max_tokens
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < slots) + (slots,)
        self.prefill_buckets = prefill_buckets(max_tokens) if compile else None  # None: prompts run unpadded
        self.warmup_budget_s = warmup_budget_s
        self.compiled = compile
        self._encode = self.encode_eager
        self._forward = self.forward_eager
        self._step = self.step_eager
        if compile:
            cuda = self.device.type == "cuda"
            self.allow_variants()
            self._encode = torch.compile(self.encode_eager, fullgraph=True, dynamic=False)
            # Prompt lengths are padded to buckets; dynamic shapes keep that to one graph (no CUDA graphs:
            # a prefill's hundreds of tokens already amortise its kernel launches).
            self._forward = torch.compile(self.forward_eager, fullgraph=True, dynamic=True)
            # CUDA graphs on GPU remove the per-kernel launch cost that dominates a batch-1 step.
            self._step = torch.compile(self.step_eager, mode="reduce-overhead" if cuda else None,
                                       fullgraph=True, dynamic=True)

    @property
    def inputs_device(self) -> torch.device:
        return self.device

    def memory_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else 0

    def watch(self, on_exit) -> None:
        """Nothing to watch: this decoder lives and dies with the process (model_process.py's can exit)."""

    def close(self) -> None:
        """Nothing to stop (a model_process.ModelProcess stops its child here)."""

    def window(self, length: int) -> int:
        """Positions attention reads for a forward whose longest row has `length` tokens. Compiled: a
        power of two (one graph each); eager: exactly `length`, since a padded window only adds masked
        work (a 380-token prompt at position 4000 read 8192 positions; `python bench/prefill_depth.py`)."""
        return window_for(length, self.max_tokens) if self.compiled else min(length, self.max_tokens)

    def allow_variants(self) -> None:
        """Let dynamo keep one graph per (batch bucket, window, rows contiguous or not).
        Its config is thread-local: call this on every thread that runs the compiled step."""
        variants = 4 * len(self.batch_buckets) * (self.max_tokens // MIN_WINDOW).bit_length() + 16
        allow_recompiles(variants)

    def forward(self, **inputs):
        """The Llama decoder on this cache, whichever keyword the installed transformers uses for it."""
        return self.text(**inputs, **{self.cache_argument: self.cache}, use_cache=True).last_hidden_state

    @torch.no_grad()
    def encode_eager(self, features: torch.Tensor) -> torch.Tensor:
        """[chunks, mels, 3000] log-mel features -> [chunks * 375, hidden] audio embeddings."""
        return self.model.get_audio_features(features).pooler_output

    @torch.no_grad()
    def forward_eager(self, embeds, rows, positions, window: int, first_row: int, last) -> torch.Tensor:
        """A prompt of [1, Q] embeddings written at `positions` of `rows` -> [V] logits after the [1] `last` one."""
        self.cache.route(rows, positions, window, first_row)
        hidden = self.forward(inputs_embeds=embeds, attention_mask=causal_mask(positions, window),
                              position_ids=positions)
        return self.model.lm_head(hidden[0].index_select(0, last)[0])

    @torch.no_grad()
    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """[chunks, mels, 3000] log-mel features -> [chunks * 375, hidden] audio embeddings."""
        return self._encode(features.to(self.device, self.model.dtype))

    def encode_clips(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Padded 16 kHz clips (a prompt's audio) -> [chunks * 375, hidden] audio embeddings: log-mel
        features, then the encoder. Both run here, next to the model: in app.py's model process the
        features cost one uncontended STFT, where the app's process paid a GIL hand-over per torch op
        behind its audio threads (`python bench/gil.py`, its second table)."""
        return self.encode_audio(prompts.audio_features(self.extractor, clips, self.device))

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int, features: torch.Tensor | None,
                audio: torch.Tensor | None = None) -> torch.Tensor:
        """Write `ids` (and the audio they hold) into `slot` from position `start`; -> [V] next-token logits.
        The audio comes as log-mel `features`, or already encoded (`audio`: the embeddings of exactly
        the audio tokens in `ids`, when a long prompt is prefilled a piece at a time).

        Compiled, the prompt is padded to a bucket length; the padding's keys and values go to the
        scratch row, so the slot holds exactly what an unpadded prefill writes."""
        n = len(ids)
        size = bucket(n, self.prefill_buckets) if self.prefill_buckets else n
        ids_tensor = torch.tensor([ids + [0] * (size - n)], dtype=torch.long, device=self.device)
        embeds = self.embed(ids_tensor)
        if features is not None:
            audio = self.encode_audio(features)
        if audio is not None and len(audio):
            is_audio = ids_tensor == self.audio_token_id
            if int(is_audio.sum()) != audio.shape[0]:
                raise ValueError(f"{int(is_audio.sum())} audio tokens but {audio.shape[0]} audio embeddings")
            embeds = embeds.masked_scatter(is_audio[..., None], audio.to(embeds.dtype))
        offsets = torch.arange(size, device=self.device)
        positions = (start + offsets).clamp(max=self.max_tokens - 1)[None]
        rows = torch.where(offsets < n, slot, self.cache.scratch_row)[None]  # [1, size]
        last = torch.tensor([n - 1], device=self.device)  # a tensor: an int would be specialised per length
        return self._forward(embeds, rows, positions, self.window(start + n), slot + ROW_OFFSET, last)

    @torch.no_grad()
    def offload(self, row: int, length: int) -> HostRows:
        """Copy the first `length` positions of `row` to host memory (the row may be reused at once: the
        copy is queued on the stream before anything that writes the row)."""
        cuda = self.device.type == "cuda"
        layers = self.cache.keys + self.cache.values
        host = torch.empty((len(layers), *layers[0][row, :, :length].shape), dtype=layers[0].dtype,
                           pin_memory=cuda)
        for i, tensor in enumerate(layers):
            host[i].copy_(tensor[row, :, :length], non_blocking=cuda)
        return HostRows(host, length)

    @torch.no_grad()
    def restore(self, row: int, kept: HostRows) -> None:
        """Copy a conversation's `offload`ed positions back, into `row` (queued before its prefill)."""
        for i, tensor in enumerate(self.cache.keys + self.cache.values):
            tensor[row, :, :kept.length].copy_(kept.data[i], non_blocking=True)

    def discard(self, kept: HostRows) -> None:
        """Nothing to do here: the host copy goes with its last reference (model_process.py keeps its own)."""

    @torch.no_grad()
    def step_eager(self, rows, tokens, positions, window: int, temperature, top_p,
                   first_row: int | None) -> torch.Tensor:
        """One decode step for B rows: [B] tokens at [B] positions -> [B] sampled next tokens."""
        positions = positions[:, None]
        self.cache.route(rows[:, None], positions, window, first_row)
        hidden = self.forward(input_ids=tokens[:, None], attention_mask=causal_mask(positions, window),
                              position_ids=positions)
        logits = self.model.lm_head(hidden[:, -1])
        return sample(logits, temperature, top_p)  # greedy rows too: one graph, not one per mode

    def step(self, rows: list[int], tokens: list[int], positions: list[int],
             temperature: list[float], top_p: list[float]) -> list[int]:
        """Decode one token for each row (host lists in and out: the one sync per step).

        Rows run in slot order, so adjacent slots form a contiguous run that attention reads in place."""
        n = len(rows)
        size = bucket(n, self.batch_buckets)
        pad = size - n
        order = sorted(range(n), key=rows.__getitem__)
        contiguous = pad == 0 and all(rows[j] == rows[order[0]] + k for k, j in enumerate(order))
        first_row = rows[order[0]] + ROW_OFFSET if contiguous else None

        def tensor(values, fill, dtype):
            return torch.tensor([values[j] for j in order] + [fill] * pad, dtype=dtype, device=self.device)

        window = self.window(max(positions) + 1)
        out = self._step(tensor(rows, self.cache.scratch_row, torch.long), tensor(tokens, 0, torch.long),
                         tensor(positions, 0, torch.long), window,
                         tensor(temperature, 0.0, torch.float32), tensor(top_p, 1.0, torch.float32), first_row)
        sampled = out[:n].tolist()
        result = [0] * n
        for k, j in enumerate(order):
            result[j] = sampled[k]
        return result

    def warm_up(self) -> tuple[int, int]:
        """Compile (and on GPU capture CUDA graphs for) the prefill and the decode step's variants before
        a user's turn, likeliest first, for at most `warmup_budget_s`; what is left compiles on first use.
        -> (variants run, variants there are).

        Run at start-up only, before any slot holds a conversation: it writes junk into the rows."""
        started = time.perf_counter()
        scratch = self.cache.scratch_row
        windows = sorted({window_for(2 ** i, self.max_tokens) for i in range(8, 31) if 2 ** i <= 2 * self.max_tokens})
        runs = [lambda n=n: self.prefill(scratch, [0] * n, 0, None) for n in (17, 300) if n <= self.max_tokens]
        for window in windows:
            for size in self.batch_buckets:
                row_sets = [list(range(first, first + size)) for first in range(self.slots - size + 1)]  # contiguous
                if size > 1:
                    row_sets.append([scratch] * (size - 1) + [0])  # scattered (padded) rows: a gathered copy
                for rows in row_sets:  # on GPU each (rows, window) is a CUDA graph of its own
                    runs.append(lambda r=rows, w=window: self.step(r, [0] * len(r), [w - 1] * len(r),
                                                                   [1.0] * len(r), [1.0] * len(r)))
        done = 0
        for run in runs:
            if done and time.perf_counter() - started > self.warmup_budget_s:
                break
            run_started = time.perf_counter()
            run()
            done += 1
            logger.debug("warm-up variant %d: %.2f s", done, time.perf_counter() - run_started)
        logger.info("warm-up: %d of %d variants in %.1f s (budget %.0f s)", done, len(runs),
                    time.perf_counter() - started, self.warmup_budget_s)
        return done, len(runs)
