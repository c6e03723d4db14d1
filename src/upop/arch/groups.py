"""Prunable groups: what UPop scores, masks and slices.

A :class:`Group` is one attention module or one MLP of one transformer block. Its *units* are
head-dimension channels (attention, granularity ``"head-dim"``, the paper: channel ``j`` of every
head, in Q, K and V together), whole heads (attention, granularity ``"head"``: head ``h``, all its
channels in Q, K and V) or hidden neurons (MLP). With ``granularity="both"`` every attention module
gives two groups, a *pair*: its channels (``<name>``) and its heads (``<name>.heads``); the cell
``(h, j)`` is kept when head ``h`` and channel ``j`` both are, so the module's cost is bilinear,
``cell cost x heads x channels`` (:func:`exact_cost`). Groups are found by the architecture specs in
:mod:`upop.arch`; this module only describes them and knows how a unit maps to rows and columns
of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KINDS = ("attention", "mlp")
MODALITIES = ("vision", "text", "fusion", "decoder")
#: what an attention unit is: a head-dimension channel shared by all heads (the paper), a whole
#: head, or both ranked together (two groups per attention module)
GRANULARITIES = ("head-dim", "head", "both")
#: name suffix of the head group of an attention pair (granularity ``"both"``)
HEADS_SUFFIX = ".heads"


@dataclass(frozen=True)
class Group:
    """One prunable structure of a model.

    Attributes:
        name: unique name, ``<block path>.<site>`` (e.g. ``vision_model.encoder.layers.0.attn``).
        kind: ``"attention"`` or ``"mlp"``.
        modality: ``"vision"``, ``"text"``, ``"fusion"`` (cross-attention of a fusion encoder)
            or ``"decoder"``.
        layer: index of the block inside its tower.
        num_units: units of the dense group (attention: head_dim, or the number of heads for
            granularity ``"head"``; MLP: intermediate size).
        num_heads: heads of the attention module as found (1 for an MLP). With granularity
            ``"head-dim"`` every unit spans all of them; with ``"head"`` it equals ``num_units``.
        producers: qualified names of the Linear layers whose output rows a unit owns
            (Q, K, V; a fused QKV; or fc1).
        consumer: qualified name of the Linear whose input columns a unit owns (out-proj, fc2).
        fused_qkv: the single producer is a fused QKV Linear laid out as ``[3, heads, head_dim]``.
        module: qualified name of the module whose attributes the forward reads (attention
            module for attention groups, block for MLPs); the arch spec updates it after slicing.
        param_cost: parameters one unit holds (exact count: weights and biases, METHOD §4).
        flop_cost: FLOPs (2 x multiply-adds) one unit costs per sample, with ``tokens_q`` query
            tokens and ``tokens_kv`` key/value tokens.
        granularity: ``"head-dim"`` (channels; also every MLP group) or ``"head"`` (whole heads).
        head_dim: channels per head of an attention module as found (0 for an MLP); a head unit
            owns this many rows of each of Q, K and V.
        pair: with granularity ``"both"``, the name of the other group of the same attention
            module (the channel group ``<name>`` and the head group ``<name>.heads`` name each
            other); ``""`` otherwise. Paired groups share their rows: a unit's cost
            (``param_cost``, ``flop_cost``) is its cost in the dense module, and the exact cost of a
            pruned pair is ``cell_cost x kept heads x kept channels`` (:meth:`cell_cost`).
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
    granularity: str = "head-dim"
    head_dim: int = 0
    pair: str = ""

    @property
    def whole_heads(self) -> bool:
        """True for an attention group whose units are whole heads."""
        return self.granularity == "head"

    def cost(self, kind: str = "params") -> int:
        """Cost of one unit under the budget ``kind`` (``"params"`` or ``"flops"``)."""
        return self.param_cost if kind == "params" else self.flop_cost

    def cell_cost(self, kind: str = "params") -> float:
        """Cost of one (head, channel) cell of an attention group (a unit spans ``num_heads`` cells
        as a channel, ``head_dim`` cells as a head)."""
        return self.cost(kind) / (self.head_dim if self.whole_heads else self.num_heads)

    def rows(self, kept: torch.Tensor | list[int], width: int | None = None) -> torch.Tensor:
        """Rows of each producer (and input columns of the consumer) owned by units ``kept``.

        ``width`` is the current number of units of the group (``num_units`` when dense).
        Channels (``"head-dim"``): channel ``j`` of every head, ``h * width + j``. Whole heads:
        head ``h``'s block ``h * head_dim .. (h + 1) * head_dim - 1``. For a fused QKV producer
        use :meth:`fused_rows`.
        """
        kept = torch.as_tensor(kept, dtype=torch.long)
        if self.whole_heads:
            return (kept.unsqueeze(1) * self.head_dim + torch.arange(self.head_dim, dtype=torch.long)).reshape(-1)
        width = self.num_units if width is None else width
        heads = torch.arange(self.num_heads, dtype=torch.long).unsqueeze(1) * width
        return (heads + kept.unsqueeze(0)).reshape(-1)

    def fused_rows(self, kept: torch.Tensor | list[int], width: int | None = None) -> torch.Tensor:
        """Rows of a fused ``[3, heads, head_dim]`` QKV weight owned by units ``kept``."""
        width = self.num_units if width is None else width
        per = self.rows(kept, width)
        block = width * self.head_dim if self.whole_heads else self.num_heads * width
        return torch.cat([per + s * block for s in range(3)])

    def mask_expansion(self) -> int:
        """How many times the unit mask repeats along a producer's output features (channel and
        MLP groups; a whole-head mask is expanded by :meth:`expand_mask`)."""
        if self.kind == "mlp":
            return 1
        return (1 if self.whole_heads else self.num_heads) * (3 if self.fused_qkv else 1)

    def expand_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The unit mask as one scale per output feature of a producer (``[3,] heads, head_dim``
        layout): channels repeat it once per head, whole heads repeat each value ``head_dim``
        times; a fused QKV producer repeats the result for Q, K and V."""
        if self.kind == "mlp":
            return mask
        if self.whole_heads:
            mask = mask.repeat_interleave(self.head_dim)
        repeat = self.mask_expansion()
        return mask.repeat(repeat) if repeat > 1 else mask


def cell_rows(head_dim: int, heads: torch.Tensor | list[int], channels: torch.Tensor | list[int],
              num_heads: int, fused: bool) -> torch.Tensor:
    """Rows of an attention producer kept when heads ``heads`` and channels ``channels`` are kept
    (a pair): ``h * head_dim + j`` for every kept ``h`` and ``j``, head-major, repeated for Q, K and
    V with offsets of ``num_heads * head_dim`` when the producer is a fused QKV (``fused``). Non-fused,
    also the input columns of the out-proj."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    channels = torch.as_tensor(channels, dtype=torch.long)
    rows = (heads.unsqueeze(1) * head_dim + channels.unsqueeze(0)).reshape(-1)
    if not fused:
        return rows
    return torch.cat([rows + s * num_heads * head_dim for s in range(3)])


def exact_cost(groups: list[Group], kept: dict[str, int] | None = None, kind: str = "params") -> float:
    """Exact prunable cost of a model whose group ``name`` keeps ``kept[name]`` units (dense when
    ``kept`` is None): a group costs ``unit cost x kept units``, except a pair (granularity ``"both"``),
    counted once as ``cell cost x kept heads x kept channels``."""
    by_name = {g.name: g for g in groups}
    total = 0.0
    for g in groups:
        units = g.num_units if kept is None else kept[g.name]
        if not g.pair:
            total += g.cost(kind) * units
        elif not g.whole_heads:  # the channel group counts the pair
            heads = by_name[g.pair]
            total += g.cell_cost(kind) * units * (heads.num_units if kept is None else kept[heads.name])
    return total
