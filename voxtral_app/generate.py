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

    Runs on the device without a host sync (exponential-race sampling instead of multinomial).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature.clamp_min(1e-5)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs * (mass_before < top_p[:, None])  # the top token always stays
    race = sorted_probs / torch.empty_like(sorted_probs).exponential_(1.0)
    sampled = order.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


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
            self._encode = torch.compile(self.encode_eager, fullgraph=True, dynamic=False)
            # CUDA graphs on GPU remove the per-kernel launch cost that dominates a batch-1 step.
            self._step = torch.compile(self.step_eager, mode="reduce-overhead" if cuda else None,
                                       fullgraph=True, dynamic=True)

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
    def step_eager(self, rows, tokens, positions, window: int, temperature, top_p) -> torch.Tensor:
        """One decode step for B rows: [B] tokens at [B] positions -> [B] sampled next tokens."""
        positions = positions[:, None]
        self.cache.route(rows, positions, window)
        hidden = self.text(input_ids=tokens[:, None], attention_mask=causal_mask(positions, window),
                           position_ids=positions, cache=self.cache, use_cache=True).last_hidden_state
        return sample(self.model.lm_head(hidden[:, -1]), temperature, top_p)

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
                         tensor(temperature, 0.0, torch.float32), tensor(top_p, 1.0, torch.float32))
        return out[:n].tolist()
