"""transformers', torch dynamo's and mistral-common's internals that the model layer reaches.

Written for transformers 5.24.0 and 5.17.0 (the GPU kit's), torch 2.11-2.13, mistral-common 1.13.1
(compat.WRITTEN_FOR). Nothing here imports fastrtc or gradio: the GPU bench imports this module.
"""

import inspect

import torch


def language_model(model):
    """VoxtralForConditionalGeneration's Llama decoder (`model.model.language_model` in transformers 5)."""
    return model.model.language_model


def cache_argument(decoder) -> str:
    """The decoder's keyword for its KV cache: transformers 5.24 says `cache`, 5.17 `past_key_values`."""
    parameters = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(decoder).__name__}.forward takes neither `cache` nor `past_key_values`")


def mark_static(tensor: torch.Tensor) -> None:
    """Tell dynamo the tensor is updated in place (no copies under CUDA graphs)."""
    torch._dynamo.mark_static_address(tensor)


def allow_recompiles(variants: int) -> None:
    """Let dynamo keep `variants` graphs per function (its config is thread-local: call it on every
    thread that runs compiled code)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, variants)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * variants)


def text_tokens(processor, text: str) -> list[int]:
    """Plain text -> Tekken token ids without BOS/EOS, through the mistral-common tokenizer that
    transformers' Voxtral processor wraps (`processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer`)."""
    return processor.tokenizer.tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)
