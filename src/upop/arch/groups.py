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
        kv_heads: key/value heads of a grouped-query attention (``num_key_value_heads`` <
            ``num_heads``: K and V have this many heads, each serving ``num_heads // kv_heads``
            query heads); 0 when K and V have ``num_heads`` heads. A channel unit spans every head
            of Q, K and V; a whole-head unit is one KV head with its query heads.
        rope: the head channels are rotated in pairs by rotary position embeddings (channel ``j``
            with ``j + head_dim / 2``): a channel unit is such a pair, so ``num_units`` is
            ``head_dim / 2`` and unit ``u`` owns channels ``u`` and ``u + head_dim / 2`` of every head.
        masked: the producers the unit mask multiplies (empty: all of them). A gated MLP slices the
            rows of its gate and up projections together but masks only the up projection, so that
            the masked neuron is ``act(gate) * up * mask``, linear in the mask.
        channel_params: parameters of one channel unit that do not scale with the heads (the
            weights of per-head norms over ``head_dim``, shared by every head: Qwen3's ``q_norm`` /
            ``k_norm``); part of ``param_cost``, and of a pair's exact cost as
            ``channel_params x kept channels`` beside the bilinear cells.
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
    kv_heads: int = 0
    rope: bool = False
    masked: tuple[str, ...] = ()
    channel_params: int = 0

    @property
    def whole_heads(self) -> bool:
        """True for an attention group whose units are whole heads."""
        return self.granularity == "head"

    @property
    def mask_producers(self) -> tuple[str, ...]:
        """The producers whose output the unit mask multiplies."""
        return self.masked or self.producers

    @property
    def grouped(self) -> bool:
        """True for an attention group whose units need :meth:`unit_rows` (rotary pairs or
        grouped-query heads) rather than the uniform layout of :meth:`rows`."""
        return self.kind == "attention" and (self.rope or bool(self.kv_heads))

    @property
    def head_units(self) -> int:
        """Whole-head units of the attention module: its K/V heads (grouped-query) or its heads."""
        return self.kv_heads or self.num_heads

    @property
    def channel_units(self) -> int:
        """Channel units of one head: rotary pairs (``head_dim / 2``) or channels (``head_dim``)."""
        return self.head_dim // 2 if self.rope else self.head_dim

    def _heads_of(self, name: str) -> int:
        """Heads of the producer or consumer ``name`` (K and V of a grouped-query attention have
        ``kv_heads``; Q and the out-projection ``num_heads``)."""
        return self.kv_heads if self.kv_heads and name in self.producers[1:] else self.num_heads

    def _queries_per_unit(self, name: str) -> int:
        """Heads of ``name`` in one whole-head unit (one KV head and its query heads)."""
        if not self.kv_heads or name in self.producers[1:]:
            return 1
        return self.num_heads // self.kv_heads

    def channels(self, kept: list[int]) -> list[int]:
        """Head channels owned by channel units ``kept``, in the pruned layout: rotary pairs keep
        their first halves, then their second halves, so that the pruned head rotates ``i`` with
        ``i + kept`` exactly as the dense head rotated ``u`` with ``u + head_dim / 2``."""
        kept = list(kept)
        if not self.rope:
            return kept
        half = self.head_dim // 2
        return kept + [u + half for u in kept]

    def grouped_rows(self, name: str, channel_units, head_units) -> torch.Tensor:
        """Rows of producer ``name`` (input columns of the consumer) of an attention group kept when
        channel units ``channel_units`` (:meth:`channels`) of whole-head units ``head_units`` (K/V
        heads with their query heads) are kept; every attention layout works (rotary pairs,
        grouped-query heads, a fused QKV)."""
        per = self._queries_per_unit(name)
        heads = [g * per + i for g in head_units for i in range(per)]
        return cell_rows(self.head_dim, heads, self.channels(channel_units), self._heads_of(name), self.fused_qkv)

    def unit_rows(self, name: str, kept: list[int]) -> torch.Tensor:
        """Rows of producer ``name`` (input columns of the consumer) owned by units ``kept``, for any
        attention group (rotary pairs, grouped-query heads) and MLP group."""
        if self.kind == "mlp":
            return torch.as_tensor(list(kept), dtype=torch.long)
        if self.whole_heads:
            return self.grouped_rows(name, range(self.channel_units), kept)
        return self.grouped_rows(name, kept, range(self.head_units))

    def cost(self, kind: str = "params") -> int:
        """Cost of one unit under the budget ``kind`` (``"params"`` or ``"flops"``)."""
        return self.param_cost if kind == "params" else self.flop_cost

    def linear_cost(self, kind: str = "params") -> int:
        """The part of one unit's cost that does not scale with the heads (:attr:`channel_params`
        under a parameter budget)."""
        return self.channel_params if kind == "params" else 0

    def cell_cost(self, kind: str = "params") -> float:
        """Cost of one (head, channel) cell of an attention group (a channel unit spans
        :attr:`head_units` cells, a whole-head unit :attr:`channel_units` cells), without
        :meth:`linear_cost`."""
        return (self.cost(kind) - self.linear_cost(kind)) / (self.channel_units if self.whole_heads else self.head_units)

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

    def expand_mask(self, mask: torch.Tensor, producer: str = "") -> torch.Tensor:
        """The unit mask as one scale per output feature of a producer (``[3,] heads, head_dim``
        layout): channels repeat it once per head, whole heads repeat each value ``head_dim``
        times; a fused QKV producer repeats the result for Q, K and V. A group of rotary pairs or
        grouped-query heads (:attr:`grouped`) expands per ``producer`` (its name): a pair's value
        covers both of its channels, K and V repeat over ``kv_heads``, and a whole-head unit of Q
        covers its query heads."""
        if self.kind == "mlp":
            return mask
        if self.grouped:
            name = producer or self.producers[0]
            if self.whole_heads:
                return mask.repeat_interleave(self.head_dim * self._queries_per_unit(name))
            per_head = torch.cat([mask, mask]) if self.rope else mask
            return per_head.repeat(self._heads_of(name))
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
    counted once as ``cell cost x kept heads x kept channels`` plus ``linear cost x kept channels``."""
    by_name = {g.name: g for g in groups}
    total = 0.0
    for g in groups:
        units = g.num_units if kept is None else kept[g.name]
        if not g.pair:
            total += g.cost(kind) * units
        elif not g.whole_heads:  # the channel group counts the pair
            heads = by_name[g.pair]
            total += g.cell_cost(kind) * units * (heads.num_units if kept is None else kept[heads.name])
            total += g.linear_cost(kind) * units
    return total
