"""One conversation: its state machine (conversation), the typed events it emits (events), spoken replies (speech)."""
