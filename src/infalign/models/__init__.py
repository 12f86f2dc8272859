"""Models and data: HH-RLHF data, tokenizer, policy (SFT reference), reward models and their training, sampling
(`generate` and response log-probs), the default-model build. No Lightning loop state; uses `runtime/` for caches."""
