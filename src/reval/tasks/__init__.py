"""Tasks: where prompts, reference answers and verifiers come from (stage 1 of the pipeline)."""
