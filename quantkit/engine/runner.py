"""The model's forward over a paged KV cache: the Llama layer (RoPE, RMSNorm, GQA, tied embeddings)
and what the other families of quantkit.models.families add to it (quantkit.engine.layers: Gemma's
(1 + w) norms and norms on the attention / MLP outputs, per-head q/k norms, GELU-tanh, sliding-window
layers, soft-capped attention scores and logits, Gemma 3's per-layer-type rotary, Phi-3's packed
qkv_proj / gate_up_proj) and, in a mixture of experts' sparse layers, the router and the experts in
place of the MLP (quantkit.engine.moe).

The runner borrows the loaded transformers model's modules (embedding, the linears, which are
nn.Linear for a float model or quantkit's quantized modules for a checkpoint, the norms'
weights and the rotary embedding) and runs the layer math itself; K/V go to a cache of flat slots
[num_blocks * block_size], a sequence's position p living in slot
block_table[p // block_size] * block_size + p % block_size (quantkit.engine.block_manager).

Two entry points:
  prefill(chunks)  new tokens of several sequences, each attending to its cached prefix and
                   causally to itself; the linears see all tokens at once, attention runs per
                   sequence. Returns the logits of each sequence's last token.
  decode(...)      S tokens for each of B sequences (S = 1, or 1 + k draft tokens to verify),
                   fixed shapes so that CUDA graphs can capture it. Returns logits [B, S, V].
The per-layer ops (RMSNorm with the residual add, RoPE with the cache write, paged decode
attention, SiLU * up; the other families' in quantkit.engine.layers) are quantkit.kernels.engine_ops:
fused CUDA kernels for half precision on a GPU, the transformers code's own torch math elsewhere.
Prefill attention is torch's scaled_dot_product_attention over each sequence's gathered K/V (on a
GPU, not through cuDNN: _PREFILL_ATTENTION); a layer with soft-capped scores (Gemma 2), which that
cannot compute, runs the paged attention op over the sequence instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantkit.engine import layers
from quantkit.engine.layers import BlockParts, block_parts, model_facts, norm_eps
from quantkit.engine.moe import PATH as MOE_PATH, moe_mlp
from quantkit.errors import UnsupportedModelError
from quantkit.nn.quant_linear import IntWeightLinear, W8A8Linear
from quantkit.kernels import engine_ops as ops
from quantkit.kernels.w8a8 import PreparedW8A8, w8a8_matmul_quantized
from quantkit.models.families import Family, block_family


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    def kv_bytes_per_slot(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class PrefillChunk:
    """One sequence's part of a prefill: tokens at positions start .. start + len(tokens) - 1 and
    the cache slots of the whole context 0 .. start + len(tokens) - 1 (the tokens' own are the
    last len(tokens))."""

    tokens: list[int]
    start: int
    context_slots: list[int]


# Prefill attention on a GPU: not cuDNN's, which builds an execution plan for each new shape, so every
# prompt length it has not seen yet would pay that in time to first token (BENCHMARKS.md, the engine).
_PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm: torch.nn.Module, module: torch.nn.Module,
                 offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """module(RMSNorm(x + residual)) and x + residual: through a quantized linear, one entry point
    (for one token on the CUDA kernel one launch: the decode kernel normalizes its input itself,
    with Llama's norm: Gemma's (offset + w) runs unfused); into a W8A8 linear with per-token
    inputs, the norm writes them quantized (_quantized_input)."""
    if type(module) is IntWeightLinear and not offset:
        return ops.rms_norm_matmul(x, residual, norm.weight, norm_eps(norm), module.prepared(), module.bias)
    w = _quantized_input(module)
    if w is not None:
        xq, sx, residual = ops.add_rms_norm_quant(x, residual, norm.weight, norm_eps(norm), w.act, offset)
        return w8a8_matmul_quantized(xq, sx, w, module.bias, x.dtype), residual
    h, residual = ops.add_rms_norm(x, residual, norm.weight, norm_eps(norm), offset)
    return module(h), residual


def _act_linear(act_mul, gate: torch.Tensor, up: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """module(act_mul(gate, up)) (the MLP's down projection); into a W8A8 linear with per-token
    inputs, SiLU * up writes them quantized (_quantized_input)."""
    w = _quantized_input(module) if act_mul is ops.silu_mul else None
    if w is not None:
        xq, sx = ops.silu_mul_quant(gate, up, w.act)
        return w8a8_matmul_quantized(xq, sx, w, module.bias, gate.dtype)
    return module(act_mul(gate, up))


def _quantized_input(module: torch.nn.Module) -> PreparedW8A8 | None:
    """The weight of a W8A8 linear that quantizes its input per token (dynamic, one scale per row:
    not in groups), which the op in front of it can then write quantized (engine_ops'
    add_rms_norm_quant, silu_mul_quant) for w8a8_matmul_quantized: the values and the matmul are
    the linear's own, one kernel and one pass over the activations fewer. None for any other module,
    and for one with forward hooks."""
    if type(module) is not W8A8Linear or not module.act.dynamic or module._forward_pre_hooks or module._forward_hooks:
        return None  # a hook (an online rotation of the input) must see the module called
    w = module.prepared()
    return None if w.grouped else w


class ModelRunner:
    def __init__(self, model: torch.nn.Module, family: Family, num_slots: int, max_positions: int,
                 kv_dtype: torch.dtype | None = None):
        """kv_dtype: the KV cache's element type; None: the model's (torch.float8_e4m3fn: an FP8 cache,
        written rounded and saturating, read exactly, see EngineConfig.kv_cache_dtype)."""
        rotated = [n for n, m in model.named_modules() if getattr(m, "_quantkit_online_block", None)
                   and ".experts." in n]
        if rotated:  # the grouped expert path calls the experts' weights itself, past their pre-hooks
            raise UnsupportedModelError(f"the engine does not apply online input rotations to experts ({rotated[0]})")
        self.model = model
        self.config = model.config
        self.shape = Shape.of(self.config)
        self.embed = model.get_submodule(family.embed)
        self.blocks = list(model.get_submodule(family.blocks))
        self.norm = model.get_submodule(family.final_norm)
        self.lm_head = model.get_submodule(family.lm_head)
        self.rotary = model.get_submodule(family.rotary)
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        s = self.shape
        # cache[layer] = (K, V), each [num_slots, kv_heads, head_dim]
        kv_dtype = kv_dtype or self.dtype
        self.cache = [(torch.zeros(num_slots, s.kv_heads, s.head_dim, device=self.device, dtype=kv_dtype),
                       torch.zeros(num_slots, s.kv_heads, s.head_dim, device=self.device, dtype=kv_dtype))
                      for _ in range(s.layers)]
        self.facts = model_facts(model, family)
        # act(gate) * up: Llama's SiLU, another family's activation op, or None: the model's MLP module runs
        act = self.facts.activation
        self.act_mul = ops.silu_mul if act == "silu" else layers.activation_op(act)
        self.rope = self._rope_tables(max_positions)
        self.parts: list[BlockParts] = [block_parts(block, block_family(family, self.config, i), self.config)
                                        for i, block in enumerate(self.blocks)]
        # how the sparse layers of a mixture of experts run (None: no sparse layer); a step whose
        # experts' matmuls are sized on the host cannot be a CUDA graph
        self.moe_path = MOE_PATH if any(p.moe is not None for p in self.parts) else None
        self.graphable = self.moe_path is None

    def _rope_tables(self, max_positions: int) -> dict:
        """Rotary key (the layer type, Gemma 3; None: one for every layer) -> (cos, sin)
        [max_positions, rotary dims] in the model's dtype: the rotary module's own output for
        positions 0 .. max_positions - 1, computed once. A step then only gathers rows, so no rotary
        code runs inside a CUDA graph (longrope's frequency switch reads a position on the host).
        Each entry is an elementwise function of its position, so the table's rows are exactly what
        the module computes for any batch of positions; the engine keeps positions inside the range
        where the frequencies do not change (layers.rope_context_limit)."""
        positions = torch.arange(max_positions, device=self.device)[None]
        x = torch.zeros(1, max_positions, 1, device=self.device, dtype=torch.float32)
        tables = {}
        for key in dict.fromkeys(self.facts.rotary_keys):
            cos, sin = self.rotary(x, positions) if key is None else self.rotary(x, positions, key)
            tables[key] = cos[0].to(self.dtype), sin[0].to(self.dtype)
        return tables

    # ---- the per-layer pieces ------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        """x [T, hidden] (embeddings) at positions [T]; K / V of the T tokens go to `slots`;
        attend(layer, q [T, heads, D]) -> [T, heads * D]. Returns the final-norm output."""
        f, offset = self.facts, self.facts.offset
        rope = {key: (cos[positions], sin[positions]) for key, (cos, sin) in self.rope.items()}
        residual = None
        for i, p in enumerate(self.parts):
            attn, mlp = p.block.self_attn, p.block.mlp
            if p.qkv is not None:
                module, sizes = p.qkv
                qkv, residual = _norm_linear(x, residual, p.attn_norm, module, offset)
                q, k, v = qkv.split(sizes, dim=-1)  # views sharing one row stride
            else:
                h, residual = ops.add_rms_norm(x, residual, p.attn_norm.weight, norm_eps(p.attn_norm), offset)
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            if p.qk_norm is not None:
                q, k, v = layers.qk_norm(q, k, v, p.qk_norm, offset)
            q = ops.rope_cache(q, k, v, *rope[f.rotary_keys[i]], *self.cache[i], slots)
            x = attn.o_proj(attend(i, q))
            if p.attn_out_norm is not None:
                x = layers.out_norm(x, p.attn_out_norm, offset)
            if p.moe is not None:  # a sparse layer: router and experts (quantkit.engine.moe)
                h, residual = ops.add_rms_norm(x, residual, p.mlp_norm.weight, norm_eps(p.mlp_norm), offset)
                x = moe_mlp(h, p.moe, self.act_mul)
            elif self.act_mul is not None and p.gate_up is not None:
                module, sizes = p.gate_up
                gate_up, residual = _norm_linear(x, residual, p.mlp_norm, module, offset)
                x = _act_linear(self.act_mul, *gate_up.split(sizes, dim=-1), mlp.down_proj)
            else:
                h, residual = ops.add_rms_norm(x, residual, p.mlp_norm.weight, norm_eps(p.mlp_norm), offset)
                if self.act_mul is not None:
                    x = _act_linear(self.act_mul, mlp.gate_proj(h), mlp.up_proj(h), mlp.down_proj)
                else:
                    x = mlp(h)
            if p.mlp_out_norm is not None:
                x = layers.out_norm(x, p.mlp_out_norm, offset)
        return ops.add_rms_norm(x, residual, self.norm.weight, norm_eps(self.norm), offset)[0]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.facts.final_softcap is not None:  # in the model's dtype, as transformers caps them
            logits = layers.cap_logits(logits, self.facts.final_softcap)
        return logits.float()

    # ---- prefill -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Logits [len(chunks), V] of each chunk's last token."""
        dev = self.device
        tokens = torch.tensor([t for c in chunks for t in c.tokens], device=dev)
        positions = torch.tensor([c.start + i for c in chunks for i in range(len(c.tokens))], device=dev)
        slots = torch.tensor([sl for c in chunks for sl in c.context_slots[c.start:]], device=dev)
        ctx = [torch.tensor(c.context_slots, device=dev) for c in chunks]
        bounds = torch.tensor([0] + [len(c.tokens) for c in chunks]).cumsum(0).tolist()
        f = self.facts
        masks = {w: [self._prefix_causal_mask(len(c.tokens), c.start, w) for c in chunks] for w in set(f.windows)}

        def attend(layer: int, q):
            kc, vc = self.cache[layer]
            window, cap, scale = f.windows[layer], f.softcaps[layer], f.scales[layer]
            out = []
            for j, c in enumerate(chunks):
                if cap is not None:  # soft-capped scores: the paged op over this sequence (S = its tokens)
                    out.append(ops.paged_attention(q[bounds[j]:bounds[j + 1]], kc, vc, ctx[j][None],
                                                   positions[bounds[j]:bounds[j + 1]], scale, window, cap))
                    continue
                qj = q[bounds[j]:bounds[j + 1]].transpose(0, 1)[None]  # [1, heads, Lq, D]
                # [1, kv_heads, Lk, D], an FP8 cache read exactly into the model's dtype
                kj, vj = (c[ctx[j]].to(q.dtype).transpose(0, 1)[None] for c in (kc, vc))
                o = F.scaled_dot_product_attention(qj, kj, vj, attn_mask=masks[window][j], scale=scale, enable_gqa=True)
                out.append(o[0].transpose(0, 1).reshape(-1, self.shape.heads * self.shape.head_dim))
            return torch.cat(out)

        with sdpa_kernel(_PREFILL_ATTENTION) if dev.type == "cuda" else contextlib.nullcontext():
            h = self._layers(self.embed(tokens).to(self.dtype), positions, slots, attend)
        last = torch.tensor(bounds[1:], device=dev) - 1
        return self._logits(h[last])

    def _prefix_causal_mask(self, lq: int, start: int, window: int | None = None) -> torch.Tensor | None:
        """Query i (position start + i) sees keys 0 .. start + i, or in a sliding window only those
        at distance < window: [Lq, start + Lq] bool (None: every key)."""
        if lq == 1 and (window is None or start < window):
            return None
        i = torch.arange(lq, device=self.device)[:, None]
        j = torch.arange(start + lq, device=self.device)[None, :]
        if window is None:
            return j <= start + i
        return (j <= start + i) & (j > start + i - window)

    # ---- decode / verify -----------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               context_slots: torch.Tensor) -> torch.Tensor:
        """tokens, positions, slots [B, S] (a padding row: slots of a scratch slot, positions 0);
        context_slots [B, C]: the slots of positions 0 .. C - 1 of each sequence (C covers the
        longest, entries past a sequence's length point anywhere). Returns logits [B, S, V]."""
        b, s_len = tokens.shape
        flat_positions = positions.reshape(-1)

        def attend(layer: int, q):
            kc, vc = self.cache[layer]
            f = self.facts
            return ops.paged_attention(q, kc, vc, context_slots, flat_positions, f.scales[layer], f.windows[layer],
                                       f.softcaps[layer])

        h = self._layers(self.embed(tokens.reshape(-1)).to(self.dtype), flat_positions, slots.reshape(-1), attend)
        return self._logits(h).view(b, s_len, -1)
