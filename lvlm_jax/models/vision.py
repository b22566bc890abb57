"""The ViT family: SigLIP- and CLIP-style encoders with feature-layer selection.

CLIP: CLS token, patch conv without bias, a LayerNorm before the encoder, quick GELU, and a final
LayerNorm that HF applies to the pooled CLS token only. SigLIP: no CLS, patch conv with bias, tanh
GELU, a final LayerNorm on the sequence, and an optional attention-pooling (MAP) head.
Images are NHWC floats. Any resolution works: position embeddings are resized bicubically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvlm_jax.models import layers
from lvlm_jax.models.attention import dot_product_attention
from lvlm_jax.models.config_utils import from_dict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    cls_token: bool = False
    patch_bias: bool = True
    pre_norm: bool = False  # CLIP's pre_layrnorm
    post_norm: bool = True  # SigLIP normalises the output sequence; CLIP does not
    pool: str = "none"  # "map": SigLIP's attention-pooling head; "none"
    # Which hidden state to return: None = the final output (after post_norm where the family
    # has one); an int k = HF's hidden_states[k] (0 = embeddings, -1 = last layer, -2 = LLaVA's).
    feature_layer: int | None = None
    drop_cls: bool = True  # LLaVA's "default" strategy drops CLS; "full" keeps it
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    dense_kernel: str = "auto"  # as LanguageConfig.dense_kernel
    scan_layers: bool = True
    remat_policy: str = "none"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image handed to the connector."""
        return self.grid ** 2 + (1 if self.cls_token and not self.drop_cls else 0)

    def layers_run(self) -> int:
        """How many encoder layers must run to produce the selected feature layer."""
        if self.feature_layer is None:
            return self.depth
        k = self.feature_layer if self.feature_layer >= 0 else self.depth + 1 + self.feature_layer
        if not 0 <= k <= self.depth:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for depth "
                             f"{self.depth}")
        return k


CLIP = dict(cls_token=True, patch_bias=False, pre_norm=True, post_norm=False,
            activation="quick_gelu", norm_eps=1e-5)
SIGLIP = dict(cls_token=False, patch_bias=True, pre_norm=False, post_norm=True,
              activation="gelu_tanh", norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14 at 336px (LLaVA-1.5's tower): 303.5M parameters.
    "clip_l14_336": dict(CLIP, image_size=336, patch_size=14, width=1024, depth=24,
                         mlp_dim=4096, num_heads=16),
    "clip_l14_224": dict(CLIP, image_size=224, patch_size=14, width=1024, depth=24,
                         mlp_dim=4096, num_heads=16),
    "clip_b16_224": dict(CLIP, image_size=224, patch_size=16, width=768, depth=12,
                         mlp_dim=3072, num_heads=12),
    # SigLIP So400m/14 at 224px (PaliGemma's tower).
    "siglip_so400m14_224": dict(SIGLIP, image_size=224, patch_size=14, width=1152, depth=27,
                                mlp_dim=4304, num_heads=16),
    "siglip_b16_224": dict(SIGLIP, image_size=224, patch_size=16, width=768, depth=12,
                           mlp_dim=3072, num_heads=12),
    "tiny": dict(SIGLIP, image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128,
                 num_heads=4),
}


def vision_config(preset: str | None = None, **overrides: Any) -> VisionConfig:
    base = dict(PRESETS[preset]) if preset else {}
    base.update(overrides)
    return from_dict(VisionConfig, base, where="model.vision")


def _dtypes(cfg):
    return layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)


class MultiHeadAttention(nn.Module):
    """Bidirectional multi-head attention (q from `x`, k/v from `kv`), with biases."""

    num_heads: int
    out_dim: int
    axes: tuple = ("vision_embed", "vision_heads", "vision_head_dim")
    attention: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dense_kernel: str = "xla"

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None, mask=None) -> Array:
        kv = x if kv is None else kv
        hd = self.out_dim // self.num_heads
        e, h, d = self.axes
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel=self.dense_kernel)
        q = layers.dense((self.num_heads, hd), (e, h, d), name="q_proj", **kw)(x)
        k = layers.dense((self.num_heads, hd), (e, h, d), name="k_proj", **kw)(kv)
        v = layers.dense((self.num_heads, hd), (e, h, d), name="v_proj", **kw)(kv)
        out = dot_product_attention(q, k, v, mask, implementation=self.attention)
        return layers.dense(self.out_dim, (h, d, e), axis=(-2, -1), name="out_proj", **kw)(out)


class MLP(nn.Module):
    hidden: int
    act: str
    axes: tuple = ("vision_embed", "vision_mlp")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    dense_kernel: str = "xla"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel=self.dense_kernel)
        h = layers.dense(self.hidden, self.axes, name="fc1", **kw)(x)
        h = layers.activation(self.act)(h)
        return layers.dense(x.shape[-1], self.axes[::-1], name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer; fits nn.scan as (carry, layer index) -> (carry, None).

    Given its index, a layer past the selected feature layer (`n_run`) passes x through.
    """

    cfg: VisionConfig
    n_run: int = -1

    @nn.compact
    def __call__(self, x: Array, index: Array | None = None):
        x_in = x
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        ln = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype)
        x = layers.constrain(x, ("act_batch", None, "act_embed"))
        h = layers.LayerNorm(name="layer_norm1", **ln)(x)
        x = x + MultiHeadAttention(cfg.num_heads, cfg.width, attention=cfg.attention, dtype=dtype,
                                   param_dtype=pdtype, dense_kernel=cfg.dense_kernel,
                                   name="self_attn")(h)
        h = layers.LayerNorm(name="layer_norm2", **ln)(x)
        x = x + MLP(cfg.mlp_dim, cfg.activation, dtype=dtype, param_dtype=pdtype,
                    dense_kernel=cfg.dense_kernel, name="mlp")(h)
        if index is not None:
            x = jnp.where(index < self.n_run, x, x_in)
        return x, None


class MAPHead(nn.Module):
    """SigLIP's multihead attention pooling: one learned probe attends over the sequence."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        probe = self.param("probe", layers.param_init(nn.initializers.xavier_uniform(),
                                                      (None, None, "vision_embed")),
                           (1, 1, cfg.width), pdtype)
        probe = jnp.broadcast_to(probe.astype(dtype), (x.shape[0], 1, cfg.width))
        h = MultiHeadAttention(cfg.num_heads, cfg.width, attention=cfg.attention, dtype=dtype,
                               param_dtype=pdtype, dense_kernel=cfg.dense_kernel,
                               name="attention")(probe, x)
        y = layers.LayerNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype,
                             name="layernorm")(h)
        h = h + MLP(cfg.mlp_dim, cfg.activation, dtype=dtype, param_dtype=pdtype,
                    dense_kernel=cfg.dense_kernel, name="mlp")(y)
        return h[:, 0]


class VisionEncoder(nn.Module):
    """images [b, h, w, c] -> features [b, tokens, width] (and a pooled vector with pool='map')."""

    cfg: VisionConfig

    @nn.compact
    def __call__(self, images: Array) -> Array | tuple[Array, Array]:
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        p = cfg.patch_size
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias,
                    dtype=dtype, param_dtype=pdtype,
                    kernel_init=layers.param_init(nn.initializers.lecun_normal(),
                                                  (None, None, None, "vision_embed")),
                    bias_init=layers.param_init(nn.initializers.zeros_init(), ("vision_embed",)),
                    name="patch_embedding")(images.astype(dtype))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, cfg.width)
        n_cls = 1 if cfg.cls_token else 0
        if cfg.cls_token:
            cls = self.param("class_embedding", layers.param_init(
                nn.initializers.normal(0.02), ("vision_embed",)), (cfg.width,), pdtype)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, cfg.width)), x], 1)
        pos = self.param("position_embedding", layers.param_init(
            nn.initializers.normal(0.02), (None, "vision_embed")), (cfg.grid ** 2 + n_cls,
                                                                    cfg.width), pdtype)
        x = x + resize_position_embedding(pos, n_cls, cfg.grid, (gh, gw)).astype(dtype)[None]
        ln = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype)
        if cfg.pre_norm:
            x = layers.LayerNorm(name="pre_layernorm", **ln)(x)

        n_run = cfg.layers_run()
        block = layers.maybe_remat(EncoderLayer, cfg.remat_policy, cfg.scan_layers)
        if cfg.scan_layers:
            # All `depth` layers keep their parameters (checkpoints carry them); layers past the
            # selected feature layer are computed but their output is discarded.
            scanned = nn.scan(block, variable_axes=layers.SCANNED_COLLECTIONS,
                              split_rngs={"params": True, "dropout": True}, in_axes=0,
                              length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, n_run, name="layers")(x, jnp.arange(cfg.depth))
        else:
            for i in range(cfg.depth):
                y, _ = block(cfg, n_run, name=f"layers_{i}")(x)
                if i < n_run:
                    x = y
        if cfg.post_norm:
            post = layers.LayerNorm(name="post_layernorm", **ln)
            if cfg.feature_layer is None:
                x = post(x)
            else:
                post(x)  # created so the parameter exists, as in the checkpoints
        elif cfg.cls_token:
            # CLIP's post_layernorm normalises only the pooled CLS token (HF's pooler_output),
            # which LLaVA never reads; created so the checkpoints' parameter has a home.
            layers.LayerNorm(name="post_layernorm", **ln)(x[:, :1])
        pooled = MAPHead(cfg, name="head")(x) if cfg.pool == "map" else None
        if cfg.cls_token and cfg.drop_cls:
            x = x[:, 1:]
        x = layers.constrain(x, ("act_batch", None, "act_embed"))
        return x if pooled is None else (x, pooled)


def resize_position_embedding(pos: Array, n_cls: int, grid: int, new: tuple[int, int]) -> Array:
    """Bicubic resize of the grid part of a learned position embedding to a new patch grid."""
    if new == (grid, grid):
        return pos
    cls, grid_pos = pos[:n_cls], pos[n_cls:].reshape(grid, grid, -1)
    resized = jax.image.resize(grid_pos.astype(jnp.float32), (*new, pos.shape[-1]), "bicubic")
    return jnp.concatenate([cls, resized.reshape(-1, pos.shape[-1]).astype(pos.dtype)], 0)
