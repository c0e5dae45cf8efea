"""reval: off-policy, value-based RL post-training of language models.

The package reads in pipeline order: tasks -> rollout -> rewards -> buffer -> logprobs
-> losses -> train (optimizer loop) -> evaluate. See README.md for the map.
"""

__version__ = "0.1.0"
