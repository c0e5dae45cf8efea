"""reval: off-policy, value-based RL post-training of language models.

The package reads in pipeline order: tasks -> rollout -> rewards -> buffer -> logprobs
-> losses -> train (optimizer loop) -> evaluate. See README.md for the map.
"""

__version__ = "0.1.0"

__all__ = ["ReValConfig", "ReValTrainer", "__version__"]


def __getattr__(name: str):  # the trainer imports torch: only when it is asked for
    if name in ("ReValConfig", "ReValTrainer"):
        from reval import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'reval' has no attribute {name!r}")
