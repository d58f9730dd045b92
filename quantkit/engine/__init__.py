"""The inference engine: paged KV cache, continuous batching, speculative decoding.

sequence (a request and its state) -> block_manager (KV blocks, prefix sharing) ->
scheduler (which sequences run each step; the only code that edits them) -> runner (the
model's forward over paged KV) -> step (a decode step's inputs, eager or CUDA-graphed) ->
sampler (next tokens, rejection sampling) -> speculative (proposals and their verification)
-> engine (the loop, metrics). Speed measurement sits above it, in quantkit.eval.speed.
"""
