"""Prunable groups: what UPop scores, masks and slices.

A :class:`Group` is one attention module or one MLP of one transformer block. Its *units* are
head-dimension channels (attention: channel ``j`` of every head, in Q, K and V together) or
hidden neurons (MLP). Groups are found by the architecture specs in :mod:`upop.arch`; this
module only describes them and knows how a unit maps to rows and columns of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("attention", "mlp")
MODALITIES = ("vision", "text", "fusion", "decoder")


@dataclass(frozen=True)
class Group:
    """One prunable structure of a model.

    Attributes:
        name: unique name, ``<block path>.<site>`` (e.g. ``vision_model.encoder.layers.0.attn``).
        kind: ``"attention"`` or ``"mlp"``.
        modality: ``"vision"``, ``"text"``, ``"fusion"`` (cross-attention of a fusion encoder)
            or ``"decoder"``.
        layer: index of the block inside its tower.
        num_units: units of the dense group (head_dim for attention, intermediate size for MLP).
        num_heads: heads sharing each attention unit (1 for an MLP).
        producers: qualified names of the Linear layers whose output rows a unit owns
            (Q, K, V; a fused QKV; or fc1).
        consumer: qualified name of the Linear whose input columns a unit owns (out-proj, fc2).
        fused_qkv: the single producer is a fused QKV Linear laid out as ``[3, heads, head_dim]``.
        module: qualified name of the module whose attributes the forward reads (attention
            module for attention groups, block for MLPs); the arch spec updates it after slicing.
        param_cost: parameters one unit holds (exact count: weights and biases, METHOD §4).
        flop_cost: FLOPs (2 x multiply-adds) one unit costs per sample, with ``tokens_q`` query
            tokens and ``tokens_kv`` key/value tokens.
    """

    name: str
    kind: str
    modality: str
    layer: int
    num_units: int
    num_heads: int
    producers: tuple[str, ...]
    consumer: str
    fused_qkv: bool
    module: str
    param_cost: int
    flop_cost: int
    tokens_q: int
    tokens_kv: int
    spec: str = field(default="", compare=False)

    def cost(self, kind: str = "params") -> int:
        """Cost of one unit under the budget ``kind`` (``"params"`` or ``"flops"``)."""
        return self.param_cost if kind == "params" else self.flop_cost

    def rows(self, kept: torch.Tensor | list[int], width: int | None = None) -> torch.Tensor:
        """Rows of each producer (and input columns of the consumer) owned by units ``kept``.

        ``width`` is the current number of units of the group (``num_units`` when dense).
        For a fused QKV producer use :meth:`fused_rows`.
        """
        kept = torch.as_tensor(kept, dtype=torch.long)
        width = self.num_units if width is None else width
        heads = torch.arange(self.num_heads, dtype=torch.long).unsqueeze(1) * width
        return (heads + kept.unsqueeze(0)).reshape(-1)

    def fused_rows(self, kept: torch.Tensor | list[int], width: int | None = None) -> torch.Tensor:
        """Rows of a fused ``[3, heads, head_dim]`` QKV weight owned by units ``kept``."""
        width = self.num_units if width is None else width
        per = self.rows(kept, width)
        block = self.num_heads * width
        return torch.cat([per + s * block for s in range(3)])

    def mask_expansion(self) -> int:
        """How many times the unit mask repeats along a producer's output features."""
        if self.kind == "mlp":
            return 1
        return self.num_heads * (3 if self.fused_qkv else 1)
