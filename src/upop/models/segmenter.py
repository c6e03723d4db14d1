"""A Segmenter-style semantic segmentation model (Strudel et al., ICCV 2021) as a Hugging Face model.

``transformers`` has no Segmenter class, so upop defines one, built from standard parts:

- encoder: a ``transformers.ViTModel`` (no pooler) over the image; the class token is dropped;
- a linear projection of the patch tokens to the decoder width;
- a mask-transformer decoder: pre-norm transformer blocks over ``[patch tokens; class
  embeddings]`` (one learned embedding per class); the attention uses separate
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linears, a ``scale`` stored once from the dense
  head width and reads ``head_dim`` in its forward, and the MLP is ``fc1``/``fc2`` - the same
  layout as the ViT blocks, so upop's generic slicing prunes both;
- class masks = L2-normalised patch features x L2-normalised class features, (B, K, h, w),
  upsampled bilinearly to the image size.

Like transformers' models it takes ``output_attentions`` / ``output_hidden_states`` /
``return_dict``, supports ``attn_implementation`` ``"eager"`` and ``"sdpa"`` (encoder and decoder)
and gradient checkpointing (``gradient_checkpointing_enable()``: every ViT layer and decoder block).
``SegmenterConfig`` (``model_type="upop_segmenter"``) and the model are registered with
``AutoConfig`` and ``AutoModelForSemanticSegmentation`` when this module is imported (``import
upop`` does it), so ``AutoModelForSemanticSegmentation.from_pretrained(folder)`` of a saved dense
folder returns it, without any code from the folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, ViTConfig, ViTModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

IGNORE_INDEX = 255


class SegmenterConfig(PretrainedConfig):
    """Config of :class:`SegmenterForSemanticSegmentation`.

    ``vision_config`` is the encoder's ``ViTConfig`` (saved as a dict); ``num_labels`` the number of
    classes; ``decoder_*`` the mask transformer's depth, heads, width and MLP width.
    """

    model_type = "upop_segmenter"
    sub_configs_defaults = {"vision_config": ViTConfig}

    vision_config: dict | ViTConfig | None = None
    decoder_layers: int = 2
    decoder_heads: int = 3
    decoder_hidden_size: int = 192
    decoder_intermediate_size: int = 768
    decoder_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def num_patches(self) -> int:
        v = self.vision_config
        image = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
        patch = v.patch_size if isinstance(v.patch_size, int) else v.patch_size[0]
        return (image // patch) ** 2

    @property
    def max_position_embeddings(self) -> int:
        """Tokens the decoder sees per image (patches + class embeddings); the arch spec reads it
        for the FLOPs cost of decoder units."""
        return self.num_patches + self.num_labels


transformers.AutoConfig.register(SegmenterConfig.model_type, SegmenterConfig, exist_ok=True)


@dataclass
class SemanticSegmenterOutput(ModelOutput):
    """``logits`` (B, num_labels, H, W) at the image size; ``loss`` when labels were given;
    ``masks`` the class masks at the patch grid (B, num_labels, h, w).

    With ``output_hidden_states``: ``hidden_states`` the encoder's (embeddings, then every ViT
    layer: (B, tokens, hidden)) and ``decoder_hidden_states`` the decoder's (its input, then every
    block: (B, patches + classes, decoder_hidden_size)). With ``output_attentions``:
    ``attentions`` / ``decoder_attentions``, one (B, heads, tokens, tokens) tensor per layer, as
    transformers' vision models return them (empty under ``sdpa``, which computes no weights).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None


def _eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with the transformers attention-function signature: the output
    (B, tokens, heads, head_dim) and the weights (B, heads, tokens, tokens)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, dropout, module.training)
    return torch.matmul(probs, value).transpose(1, 2), probs


class SegmenterAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V/out projections and a stored scale, computed
    by the attention function ``config._attn_implementation`` names (eager or sdpa)."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        hidden, heads = config.decoder_hidden_size, config.decoder_heads
        if hidden % heads:
            raise ValueError(f"decoder_hidden_size {hidden} is not a multiple of decoder_heads {heads}")
        self.config = config
        self.num_heads, self.head_dim = heads, hidden // heads
        self.scale = self.head_dim**-0.5  # dense scale, kept after pruning
        self.dropout = config.decoder_dropout
        self.is_causal = False
        self.q_proj, self.k_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v_proj, self.o_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, probs = attend(self, q, k, v, None, dropout=self.dropout if self.training else 0.0, scaling=self.scale)
        return self.o_proj(out.reshape(b, n, self.num_heads * self.head_dim)), probs


class SegmenterMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class SegmenterBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; returns the
    new ``x`` and the attention weights (None under sdpa)."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        h, eps = config.decoder_hidden_size, config.layer_norm_eps
        self.layernorm_before = nn.LayerNorm(h, eps=eps)
        self.attention = SegmenterAttention(config)
        self.layernorm_after = nn.LayerNorm(h, eps=eps)
        self.mlp = SegmenterMLP(h, config.decoder_intermediate_size, config.decoder_dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.attention(self.layernorm_before(x))
        x = x + attended
        return x + self.mlp(self.layernorm_after(x)), probs


class SegmenterMaskDecoder(nn.Module):
    """Mask transformer: joint blocks over patch tokens and class embeddings, then class masks."""

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        h = config.decoder_hidden_size
        self.num_labels = config.num_labels
        self.proj_dec = nn.Linear(config.vision_config.hidden_size, h)
        self.class_embeddings = nn.Parameter(torch.zeros(1, config.num_labels, h))
        self.layers = nn.ModuleList([SegmenterBlock(config) for _ in range(config.decoder_layers)])
        self.proj_patch = nn.Linear(h, h, bias=False)
        self.proj_classes = nn.Linear(h, h, bias=False)
        self.decoder_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mask_norm = nn.LayerNorm(config.num_labels, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, list, list]:
        """Class masks (B, K, *grid), the hidden states (input, then each block) and each block's
        attention weights (None entries under sdpa)."""
        x = self.proj_dec(patches)
        n = x.shape[1]
        x = torch.cat([x, self.class_embeddings.expand(x.shape[0], -1, -1)], dim=1)
        states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x)
            states.append(x)
            attentions.append(probs)
        x = self.decoder_norm(x)
        feats = F.normalize(self.proj_patch(x[:, :n]), dim=-1)
        classes = F.normalize(self.proj_classes(x[:, n:]), dim=-1)
        masks = self.mask_norm(feats @ classes.transpose(1, 2))  # (B, N, K)
        return masks.transpose(1, 2).reshape(x.shape[0], self.num_labels, *grid), states, attentions


class SegmenterPreTrainedModel(PreTrainedModel):
    config_class = SegmenterConfig
    base_model_prefix = "segmenter"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer", "SegmenterBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SegmenterMaskDecoder):
            init.trunc_normal_(module.class_embeddings, mean=0.0, std=std)


class SegmenterForSemanticSegmentation(SegmenterPreTrainedModel):
    """ViT encoder + mask-transformer decoder; ``forward(pixel_values, labels=None)``."""

    def __init__(self, config: SegmenterConfig):
        super().__init__(config)
        self.vit = ViTModel(config.vision_config, add_pooling_layer=False)
        self.decoder = SegmenterMaskDecoder(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> SemanticSegmenterOutput | tuple:
        """Logits at the image size; ``output_attentions`` / ``output_hidden_states`` /
        ``return_dict`` default to the config's, as in transformers' models."""
        config = self.config
        attentions = config.output_attentions if output_attentions is None else output_attentions
        hidden = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        height, width = pixel_values.shape[-2:]
        patch = config.vision_config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        grid = (height // patch, width // patch)
        encoded = self.vit(pixel_values=pixel_values, output_attentions=attentions, output_hidden_states=hidden)
        masks, dec_states, dec_attentions = self.decoder(encoded.last_hidden_state[:, -grid[0] * grid[1]:], grid)
        logits = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX)
        out = SemanticSegmenterOutput(
            loss=loss, logits=logits, masks=masks,
            hidden_states=encoded.hidden_states if hidden else None,
            attentions=encoded.attentions if attentions else None,
            decoder_hidden_states=tuple(dec_states) if hidden else None,
            decoder_attentions=tuple(a for a in dec_attentions if a is not None) if attentions else None,
        )
        return out if (config.return_dict if return_dict is None else return_dict) else out.to_tuple()


def make_segmenter(hidden: int, layers: int, heads: int, intermediate: int, image_size: int, num_labels: int,
                   patch_size: int | None = None) -> SegmenterForSemanticSegmentation:
    """A randomly initialised Segmenter whose encoder and decoder share the given widths."""
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, image_size=image_size,
                  patch_size=patch_size or (8 if image_size <= 96 else 16), qkv_bias=True)
    config = SegmenterConfig(
        vision_config=vision, num_labels=num_labels, decoder_layers=layers, decoder_heads=heads,
        decoder_hidden_size=hidden, decoder_intermediate_size=intermediate,
        architectures=["SegmenterForSemanticSegmentation"],
    )
    return SegmenterForSemanticSegmentation(config)


transformers.AutoModelForSemanticSegmentation.register(SegmenterConfig, SegmenterForSemanticSegmentation, exist_ok=True)

__all__ = ["IGNORE_INDEX", "SegmenterConfig", "SegmenterForSemanticSegmentation", "make_segmenter"]
