"""Turn-taking: the turn taker (taker) and the end-of-turn model it asks at each pause (end_of_turn)."""
