"""The training loop, in three parts and a schedule:

    actor.py     steps 1-3 of a round: draw prompts, sample G answers each, score them -> Rollout
    learner.py   steps 4-6: store in the replay buffer, K updates (`update`), reference reset
    run.py       everything around them: run directory and lock, config, resume, metrics,
                 evaluation, checkpoints, stopping rules (`train`, `Run`)
    schedule.py  when the actor acts and the learner learns (`synchronous`)

and their helpers: build.py (policy, reference, data and sampler from a config), state.py
(checkpoints and resume), messages.py (what the loop says when something is off).
`reval.train` is the public entry point and re-exports what the tests and benchmarks use.
"""
