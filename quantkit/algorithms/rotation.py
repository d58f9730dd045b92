"""Rotations that take activation outliers apart (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

A few channels of an LLM's residual stream carry activations hundreds of times larger than the
rest, and one scale per token (W8A8) or per group of weights must cover them. An orthogonal Q
leaves the model's function as it is when folded in right, and x Q spreads each outlier channel
over all of them. quantkit folds, offline, into the weights (nothing extra runs at inference):

    norms        each RMSNorm's weight (offset + w) multiplies the columns of the linears it
                 feeds (q/k/v; gate/up, every expert's, the router, the shared expert's gate),
                 and the final norm's the output head's; the norms then multiply by 1, and
                 RMSNorm(x Q) = RMSNorm(x) Q, since it divides by |x|;
    residual     the embedding's rows and every linear reading the stream get W Q (readers),
                 every linear writing to it gets Q^T W and b Q (o_proj, down_proj, each
                 expert's down, the shared expert's down), the output head W Q;
    heads        (heads: true) each value head is rotated by one head_dim x head_dim H:
                 v_proj's rows of each head H^T W, o_proj's columns of each head W H.

Q and H are Hadamard matrices with random column signs where quantkit.formats.hadamard builds
one of that order, else random orthogonal ones, seeded. A tied output head is untied (it is
the embedding times the final norm's weight now), so the checkpoint holds one more matrix.
Families that normalize the attention or MLP OUTPUT before the residual add (Gemma 2 / 3) are
refused: a per-channel weight after a norm does not commute with Q.

The rotated weights are computed in float64 and stored in the model's dtype: in float32 the
rotated model's logits match the original's to rounding (tests/test_rotation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.algorithms.base import Rotation, register
from quantkit.errors import UnsupportedModelError
from quantkit.formats import FloatSpec, IntSpec
from quantkit.formats.hadamard import online_block, online_hook, rotate_blocks, rotation_matrix
from quantkit.models.families import block_family, head_dim, part_widths


@dataclass(frozen=True)
class RotateOptions:
    seed: int = 0  # of the random signs (or the random orthogonal matrix)
    heads: bool = True  # also rotate each attention head's values (v_proj rows, o_proj columns)
    # also rotate down_proj's input (every expert's) online: a block-diagonal Hadamard matrix,
    # folded into the weight and applied to the input at run time (recorded in the checkpoint)
    online: bool = False


def _set(weight: torch.nn.Parameter, value: torch.Tensor) -> None:
    weight.data = value.to(weight.dtype).contiguous()


@register
class Rotate(Rotation):
    name = "rotate"
    Options = RotateOptions
    weight_specs = (IntSpec, FloatSpec)

    def prepare(self, loaded) -> None:
        family, config = loaded.family, loaded.model.config
        if family.attn_out_norm or family.mlp_out_norm:
            raise UnsupportedModelError(
                f"rotate: {family.name} normalizes the attention and MLP outputs before the residual add "
                f"({family.attn_out_norm}, {family.mlp_out_norm}); their per-channel weights do not commute with "
                f"a rotation of the residual stream. Leave `rotate` out of the recipe for this model")
        if self.options.online and family.moe is not None:
            raise UnsupportedModelError(
                f"rotate: online: {family.name}'s experts are one fused module in transformers, where a rotation of "
                f"each expert's down_proj input cannot be recorded; use online: false for a mixture of experts")
        self.loaded, self.family, self.config = loaded, family, config
        self.q, self.kind = rotation_matrix(config.hidden_size, self.options.seed)
        self.h = rotation_matrix(head_dim(config), self.options.seed + 1)[0] if self.options.heads else None
        model = loaded.model
        if getattr(config, "tie_word_embeddings", False):  # the head becomes E diag(g) Q, the embedding E Q
            config.tie_word_embeddings = False
            head, embed = model.get_submodule(family.lm_head), model.get_submodule(family.embed)
            if head.weight is embed.weight:
                head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if loaded.weights is None:  # in memory: everything now
            self._final_gain = self._gain(model.get_submodule(family.final_norm))
            for name in [family.embed, family.final_norm, family.lm_head] + \
                        [f"{family.blocks}.{i}" for i in range(config.num_hidden_layers)]:
                self.rewrite(name, model.get_submodule(name))
        else:  # lazy: each module as the driver reads it; the final norm's gain is read for the head
            key = loaded.weights.key(f"{family.final_norm}.weight")
            self._final_gain = family.norm_offset + loaded.weights.files.read([key])[key].to(torch.float64)
            loaded.on_materialize.append(self.rewrite)

    def _gain(self, norm: torch.nn.Module) -> torch.Tensor:
        return self.family.norm_offset + norm.weight.detach().to(torch.float64)

    def rewrite(self, name: str, module: torch.nn.Module) -> None:
        """Rotate the module `name` of the model (an outer module or a decoder block)."""
        family = self.family
        if name == family.embed:
            _set(module.weight, module.weight.to(torch.float64) @ self.q)
        elif name == family.final_norm:
            module.weight.data.fill_(1.0 - family.norm_offset)
        elif name == family.lm_head:
            _set(module.weight, (module.weight.to(torch.float64) * self._final_gain[None, :]) @ self.q)
        elif name.startswith(f"{family.blocks}."):
            self._rotate_block(module, int(name.rsplit(".", 1)[1]))

    def _rotate_block(self, block: torch.nn.Module, index: int) -> None:
        fam = block_family(self.family, self.config, index)
        norms = (fam.attn_norm, fam.mlp_norm)
        for mapping in fam.mappings:
            if mapping.prev in norms:  # the norm's gain into its readers' columns, then Q
                norm = block.get_submodule(mapping.prev)
                gain = self._gain(norm)
                for rel in mapping.linears + mapping.compensate:
                    w = block.get_submodule(rel).weight
                    _set(w, (w.to(torch.float64) * gain[None, :]) @ self.q)
                norm.weight.data.fill_(1.0 - fam.norm_offset)
            else:  # the linears after v (o_proj) or up (down_proj): they write to the stream
                for rel in mapping.linears:
                    linear = block.get_submodule(rel)
                    _set(linear.weight, self.q.T @ linear.weight.to(torch.float64))
                    if getattr(linear, "bias", None) is not None:
                        _set(linear.bias, linear.bias.to(torch.float64) @ self.q)
                if self.h is not None and (mapping.prev.endswith("v_proj") or mapping.prev_part == "v"):
                    self._rotate_heads(block, mapping)
                elif self.options.online and not (mapping.prev.endswith("v_proj") or mapping.prev_part == "v"):
                    for rel in mapping.linears:  # the MLP's down: W H, and x H before it at run time
                        self._rotate_online(block.get_submodule(rel))

    def _rotate_heads(self, block: torch.nn.Module, mapping) -> None:
        """v's rows of each head H^T W (and its bias b H), o's columns of each head W H."""
        d, h = head_dim(self.config), self.h
        v = block.get_submodule(mapping.prev)
        rows = slice(0, v.weight.shape[0])
        if mapping.prev_part is not None:  # a packed q/k/v linear: v's rows
            packed = next(p for p in self.family.packed if p.linear == mapping.prev)
            widths = part_widths(packed, self.config)
            start = sum(widths[: packed.parts.index(mapping.prev_part)])
            rows = slice(start, start + widths[packed.parts.index(mapping.prev_part)])
        w = v.weight.to(torch.float64)
        part = w[rows].reshape(-1, d, w.shape[1])
        w[rows] = torch.einsum("dk,hdi->hki", h, part).reshape(-1, w.shape[1])
        _set(v.weight, w)
        if getattr(v, "bias", None) is not None:
            b = v.bias.to(torch.float64)
            b[rows] = (b[rows].reshape(-1, d) @ h).reshape(-1)
            _set(v.bias, b)
        for rel in mapping.linears:
            o = block.get_submodule(rel).weight
            w = o.to(torch.float64).reshape(o.shape[0], -1, d)
            _set(o, (w @ h).reshape(o.shape[0], -1))

    def _rotate_online(self, linear: torch.nn.Module) -> None:
        block = online_block(linear.in_features)
        _set(linear.weight, rotate_blocks(linear.weight.to(torch.float64), block))
        if getattr(linear, "_quantkit_online_block", None) is None:  # a released block read again keeps its hook
            linear._quantkit_online_block = block
            linear.register_forward_pre_hook(online_hook(block))

    def online_linears(self, model: torch.nn.Module) -> dict[str, int]:
        """Module name -> block of every linear whose input this rotation rotates online (read from the
        family tables and the modules' shapes: every block's, whether it was read yet or not)."""
        if not self.options.online:
            return {}
        out = {}
        for i in range(self.config.num_hidden_layers):
            fam = block_family(self.family, self.config, i)
            for mapping in fam.mappings:
                if mapping.prev not in (fam.attn_norm, fam.mlp_norm) and not (
                        mapping.prev.endswith("v_proj") or mapping.prev_part == "v"):
                    for rel in mapping.linears:
                        name = f"{self.family.blocks}.{i}.{rel}"
                        out[name] = online_block(model.get_submodule(name).in_features)
        return out

    def report(self, name: str) -> dict:
        return {"rotation": self.kind} if hasattr(self, "kind") else {}


def transform_config(online: dict[str, int]) -> dict | None:
    """compressed-tensors' transform_config for online input rotations (checkpoint names -> block):
    one "hadamard" scheme per block size, its head_dim the block, applied to those linears' inputs."""
    if not online:
        return None
    by_block: dict[int, list[str]] = {}
    for name, block in online.items():
        by_block.setdefault(block, []).append(name)
    return {"config_groups": {
        f"online_input_{block}": {"type": "hadamard", "apply": [{"targets": sorted(names), "location": "input",
                                                                  "inverse": False, "ignore": []}],
                                  "randomize": False, "requires_grad": False, "head_dim": block, "precision": "float32"}
        for block, names in sorted(by_block.items())}}
