"""The inference engine: paged KV cache, continuous batching, speculative decoding.

sequence (a request and its state) -> block_manager (KV blocks, prefix sharing) ->
scheduler (which sequences run each step) -> runner (the model's forward over paged
KV) -> sampler (next tokens, rejection sampling) -> engine (the loop, metrics).
"""
