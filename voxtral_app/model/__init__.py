"""The local Voxtral engine: the decode thread and its slots (engine), a conversation's KV bookkeeping (chat),
the compiled decoder (decoder), prompts (prompt), loading and checkpoints, and the model in its own process."""
