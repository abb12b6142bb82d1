"""The hot path: audio encoding, prompt prefill and a small fixed-shape decode step.

Every conversation owns one row ("slot") of a static KV cache for as long as it lives, so a new
turn only prefills what is new. Decoding runs one step for all conversations that are generating
at once (batched), reading each row's cache up to a bucketed window rather than its full length.
The step samples on the device and is the unit that torch.compile (CUDA graphs on GPU) sees; the
eager path runs the very same code, so CPU tests cover it.
"""

import logging

import torch

logger = logging.getLogger(__name__)

MIN_WINDOW = 256  # tokens; smallest attention window a decode step reads
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode batches are padded up to one of these sizes
TOP_CANDIDATES = 1024  # tokens considered when sampling; at Voxtral's temperature 0.2 the rest is ~0 mass


class SlotCache:
    """Static KV cache, one row per conversation: [slots + 1, kv_heads, max_tokens, head_dim] per layer.

    It quacks like a transformers Cache for the Llama decoder: `route()` says which rows and
    positions the next forward writes, `update()` writes there and returns the rows' first
    `window` positions. The extra last row is scratch for padded batch rows.
    """

    def __init__(self, config, slots: int, max_tokens: int, dtype: torch.dtype, device: torch.device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots + 1, config.num_key_value_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        for tensor in self.keys + self.values:
            torch._dynamo.mark_static_address(tensor)  # updated in place: no copies under CUDA graphs
        self.scratch_row = slots
        self.max_tokens = max_tokens
        self.route(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), 1)

    def route(self, rows: torch.Tensor, positions: torch.Tensor, window: int) -> None:
        self.rows = rows  # [B]
        self.positions = positions  # [B, Q]
        self.window = window

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        # key, value: [B, kv_heads, Q, head_dim]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        rows = self.rows[:, None]
        keys[rows, :, self.positions] = key.transpose(1, 2)  # indexed view is [B, Q, kv_heads, head_dim]
        values[rows, :, self.positions] = value.transpose(1, 2)
        return keys[self.rows, :, : self.window], values[self.rows, :, : self.window]


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
    """Runs Voxtral's audio encoder, prefill and batched decode steps on one SlotCache."""

    def __init__(self, model, slots: int, max_tokens: int, compile: bool):
        self.model = model
        self.device = model.device
        self.text = model.model.language_model  # the Llama decoder
        self.embed = self.text.get_input_embeddings()
        self.audio_token_id = model.config.audio_token_id
        self.cache = SlotCache(model.config.text_config, slots, max_tokens, model.dtype, self.device)
        self.max_tokens = max_tokens
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < slots) + (slots,)
        self.compiled = compile
        self._encode = self.encode_eager
        self._step = self.step_eager
        if compile:
            cuda = self.device.type == "cuda"
            self.allow_variants()
            self._encode = torch.compile(self.encode_eager, fullgraph=True, dynamic=False)
            # CUDA graphs on GPU remove the per-kernel launch cost that dominates a batch-1 step.
            self._step = torch.compile(self.step_eager, mode="reduce-overhead" if cuda else None,
                                       fullgraph=True, dynamic=True)

    def allow_variants(self) -> None:
        """Let dynamo keep one graph per (batch bucket, window, greedy or not). Its config is
        thread-local: call this on every thread that runs the compiled step."""
        variants = 2 * len(self.batch_buckets) * (self.max_tokens // MIN_WINDOW).bit_length() + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, variants)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * variants)

    @torch.no_grad()
    def encode_eager(self, features: torch.Tensor) -> torch.Tensor:
        """[chunks, mels, 3000] log-mel features -> [chunks * 375, hidden] audio embeddings."""
        return self.model.get_audio_features(features).pooler_output

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int, features: torch.Tensor | None) -> torch.Tensor:
        """Write `ids` (and the audio they hold) into `slot` from position `start`; -> [V] next-token logits."""
        ids_tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        embeds = self.embed(ids_tensor)
        if features is not None:
            audio = self._encode(features.to(self.device, self.model.dtype)).to(embeds.dtype)
            is_audio = ids_tensor == self.audio_token_id
            if int(is_audio.sum()) != audio.shape[0]:
                raise ValueError(f"{int(is_audio.sum())} audio tokens but {audio.shape[0]} audio embeddings")
            embeds = embeds.masked_scatter(is_audio[..., None], audio)
        end = start + len(ids)
        positions = torch.arange(start, end, device=self.device)[None]
        self.cache.route(torch.tensor([slot], device=self.device), positions, end)
        hidden = self.text(inputs_embeds=embeds, attention_mask=causal_mask(positions, end),
                           position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[0, -1])

    @torch.no_grad()
    def step_eager(self, rows, tokens, positions, window: int, temperature, top_p, greedy: bool) -> torch.Tensor:
        """One decode step for B rows: [B] tokens at [B] positions -> [B] sampled next tokens."""
        positions = positions[:, None]
        self.cache.route(rows, positions, window)
        hidden = self.text(input_ids=tokens[:, None], attention_mask=causal_mask(positions, window),
                           position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])
        return logits.argmax(dim=-1) if greedy else sample(logits, temperature, top_p)

    def step(self, rows: list[int], tokens: list[int], positions: list[int],
             temperature: list[float], top_p: list[float]) -> list[int]:
        """Decode one token for each row (host lists in and out: the one sync per step)."""
        n = len(rows)
        size = bucket(n, self.batch_buckets)
        pad = size - n
        scratch = self.cache.scratch_row

        def tensor(values, fill, dtype):
            return torch.tensor(values + [fill] * pad, dtype=dtype, device=self.device)

        window = window_for(max(positions) + 1, self.max_tokens)
        out = self._step(tensor(rows, scratch, torch.long), tensor(tokens, 0, torch.long),
                         tensor(positions, 0, torch.long), window,
                         tensor(temperature, 0.0, torch.float32), tensor(top_p, 1.0, torch.float32),
                         not any(t > 0 for t in temperature))  # a Python bool: one compiled variant each
        return out[:n].tolist()

    def warm_up(self) -> None:
        """Run the decode step at every batch bucket and window (greedy and sampled) once, so that
        compilation and CUDA-graph capture happen at start-up, not in a user's turn."""
        windows = sorted({window_for(2 ** i, self.max_tokens) for i in range(8, 31) if 2 ** i <= 2 * self.max_tokens})
        for size in self.batch_buckets:
            for window in windows:
                for temperature in (0.0, 1.0):
                    self.step([self.cache.scratch_row] * size, [0] * size, [window - 1] * size,
                              [temperature] * size, [1.0] * size)
