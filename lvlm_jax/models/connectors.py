"""Connectors between the vision tower and the LM: MLP projector, Q-Former-style resampler, and
Flamingo-style gated cross-attention blocks (inserted into the decoder every k layers)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lvlm_jax.models import layers
from lvlm_jax.models.config_utils import from_dict
from lvlm_jax.models.language import DecoderLayer, LanguageConfig
from lvlm_jax.models.vision import MLP, MultiHeadAttention

Array = jax.Array
KINDS = ("projector", "resampler", "cross_attention")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    kind: str = "projector"
    # projector: "linear" (PaliGemma) or "mlp{N}x_gelu" (LLaVA-1.5 uses mlp2x_gelu)
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    # PaliGemma divides image features by sqrt(LM width) before the LM scales all embeddings up.
    scale_by_inverse_sqrt_embed: bool = False
    # resampler (Q-Former / perceiver); also the media encoder of cross_attention when > 0
    num_queries: int = 32
    width: int = 768
    depth: int = 2
    num_heads: int = 12
    mlp_dim: int = 3072
    instruction_aware: bool = False  # InstructBLIP: queries attend to the instruction tokens
    instruction_vocab: int = 0  # 0 = the LM's vocabulary
    max_instruction_len: int = 128
    # cross_attention: a gated cross-attention block before every k-th decoder layer
    cross_attention_every: int = 4
    norm_eps: float = 1e-6

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model.connector.kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "projector":
            projector_depth(self.projector)


def connector_config(**values: Any) -> ConnectorConfig:
    cfg = from_dict(ConnectorConfig, values, where="model.connector")
    cfg.validate()
    return cfg


def projector_depth(name: str) -> int:
    if name == "linear":
        return 1
    if name.startswith("mlp") and name.endswith("x_gelu") and name[3:-6].isdigit():
        return int(name[3:-6])
    raise ValueError(f"unknown projector {name!r}; expected 'linear' or 'mlp<N>x_gelu'")


class Projector(nn.Module):
    """LLaVA's projector: Linear, then (GELU, Linear) x (N - 1), GELU exact as in the reference."""

    cfg: ConnectorConfig
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dense_kernel: str = "xla"  # the language tower's

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n = projector_depth(self.cfg.projector)
        kw = dict(use_bias=self.cfg.projector_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel=self.dense_kernel)
        x = layers.dense(self.out_dim, ("vision_embed", "mlp"), name="linear_1", **kw)(x)
        for i in range(2, n + 1):
            x = layers.activation("gelu")(x)
            x = layers.dense(self.out_dim, ("mlp", "embed"), name=f"linear_{i}", **kw)(x)
        if self.cfg.scale_by_inverse_sqrt_embed:
            x = x / jnp.asarray(self.out_dim ** 0.5, x.dtype)
        return x


@flax.struct.dataclass
class DenseMask:
    """An explicit boolean mask [b, 1, t, s] for dot_product_attention."""

    mask: Array
    plain_causal: bool = flax.struct.field(pytree_node=False, default=False)
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    q_prefix: Any = None

    def dense(self) -> Array:
        return self.mask


class Resampler(nn.Module):
    """N learned queries that cross-attend to image features (Q-Former / perceiver resampler).

    With `instruction_aware`, the instruction tokens join the queries in self-attention, so the
    queries extract what the instruction asks about (InstructBLIP).
    """

    cfg: ConnectorConfig
    out_dim: int
    lm_vocab: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dense_kernel: str = "xla"  # the language tower's

    @nn.compact
    def __call__(self, feats: Array, instruction: Array | None = None,
                 instruction_mask: Array | None = None) -> Array:
        cfg = self.cfg
        n = feats.shape[0]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dk = dict(dense_kernel=self.dense_kernel)
        axes = ("embed", "heads", "head_dim")
        queries = self.param("queries", layers.param_init(nn.initializers.normal(0.02),
                                                          (None, "embed")),
                             (cfg.num_queries, cfg.width), self.param_dtype)
        x = jnp.broadcast_to(queries.astype(self.dtype), (n, cfg.num_queries, cfg.width))
        q_len = cfg.num_queries
        keep = jnp.ones((n, q_len), bool)
        if cfg.instruction_aware:
            if instruction is None:
                raise ValueError("an instruction-aware resampler needs the instruction tokens")
            vocab = cfg.instruction_vocab or self.lm_vocab
            emb = nn.Embed(vocab, cfg.width, embedding_init=layers.param_init(
                nn.initializers.normal(0.02), ("vocab", "embed")), name="instruction_embed",
                **kw)(instruction)
            pos = self.param("instruction_pos", layers.param_init(
                nn.initializers.normal(0.02), (None, "embed")),
                (cfg.max_instruction_len, cfg.width), self.param_dtype)
            emb = emb + pos[: instruction.shape[1]].astype(self.dtype)[None]
            x = jnp.concatenate([x, emb], axis=1)
            imask = (jnp.ones(instruction.shape, bool) if instruction_mask is None
                     else instruction_mask.astype(bool))
            keep = jnp.concatenate([keep, imask], axis=1)
        self_mask = DenseMask(keep[:, None, None, :] & jnp.ones((1, 1, x.shape[1], 1), bool))
        ln = dict(eps=cfg.norm_eps, axis_name="embed", **kw)
        for i in range(cfg.depth):
            h = layers.LayerNorm(name=f"ln_self_{i}", **ln)(x)
            x = x + MultiHeadAttention(cfg.num_heads, cfg.width, axes, name=f"self_attn_{i}",
                                       **kw, **dk)(h, mask=self_mask)
            h = layers.LayerNorm(name=f"ln_cross_{i}", **ln)(x[:, :q_len])
            cross = MultiHeadAttention(cfg.num_heads, cfg.width, axes, name=f"cross_attn_{i}",
                                       **kw, **dk)(h, feats)
            x = x.at[:, :q_len].add(cross)
            h = layers.LayerNorm(name=f"ln_mlp_{i}", **ln)(x)
            x = x + MLP(cfg.mlp_dim, "gelu", ("embed", "mlp"), name=f"mlp_{i}", **kw, **dk)(h)
        x = layers.LayerNorm(name="final_norm", **ln)(x[:, :q_len])
        return layers.dense(self.out_dim, ("embed", "mlp"), use_bias=True, name="out_proj",
                            kernel=self.dense_kernel, **kw)(x)


class GatedCrossAttention(nn.Module):
    """Flamingo's block: x + tanh(a) * xattn(x, media); x + tanh(b) * ffw(x). a = b = 0 at init,
    so a freshly inserted block leaves the LM exactly as it was."""

    cfg: LanguageConfig

    @nn.compact
    def __call__(self, x: Array, media: Array, media_mask: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        dk = dict(kernel=cfg.dense_kernel)
        gate = lambda name: self.param(name, layers.param_init(nn.initializers.zeros_init(), ()),  # noqa: E731
                                       (), pdtype)
        ln = dict(eps=cfg.norm_eps, axis_name="embed", **kw)
        hd = cfg.resolved_head_dim
        h = layers.LayerNorm(name="attn_norm", **ln)(x)
        q = layers.dense((cfg.num_heads, hd), ("embed", "heads", "head_dim"), name="q_proj",
                         **kw, **dk)(h)
        k = layers.dense((cfg.num_heads, hd), ("embed", "heads", "head_dim"), name="k_proj",
                         **kw, **dk)(media)
        v = layers.dense((cfg.num_heads, hd), ("embed", "heads", "head_dim"), name="v_proj",
                         **kw, **dk)(media)
        from lvlm_jax.models.attention import dot_product_attention

        out = dot_product_attention(q, k, v, DenseMask(media_mask[:, None]),
                                    implementation="xla")
        out = layers.dense(cfg.embed_dim, ("heads", "head_dim", "embed"), axis=(-2, -1),
                           name="o_proj", **kw, **dk)(out)
        # Text before any image sees no media: its cross-attention output is zero, not a mean.
        out = out * jnp.any(media_mask, axis=-1, keepdims=True).astype(out.dtype)
        x = x + jnp.tanh(gate("attn_gate")).astype(dtype) * out
        h = layers.LayerNorm(name="ffw_norm", **ln)(x)
        h = MLP(4 * cfg.embed_dim, "gelu", ("embed", "mlp"), name="ffw",
                dense_kernel=cfg.dense_kernel, **kw)(h)
        return x + jnp.tanh(gate("ffw_gate")).astype(dtype) * h


class FlamingoGroup(nn.Module):
    """One gated cross-attention block followed by k decoder layers (the scanned unit)."""

    cfg: LanguageConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, group_cache, media):
        k = self.cfg.cross_attention_every
        media_feats, media_mask = media
        x = GatedCrossAttention(self.cfg, name="cross_attn")(x, media_feats, media_mask)
        new = []
        for j in range(k):
            lc = None if group_cache is None else jax.tree.map(lambda a: a[j], group_cache)
            x, c = DecoderLayer(self.cfg, name=f"layer_{j}")(x, positions, mask, cache_index, lc)
            new.append(c)
        if group_cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new)
