"""The decoder LM family: Llama/Mistral, Qwen2 and Gemma variants, scanned or not, with a KV cache.

Einsum letters: b batch, t query length, s key length, d embed, h heads, k kv heads, x head_dim.
The KV cache is an explicit pytree (`init_cache`), passed in and returned, never hidden state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lvlm_jax.models import layers
from lvlm_jax.models.attention import MaskInfo, cached_attention, dot_product_attention
from lvlm_jax.models.config_utils import from_dict

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """A decoder-only LM. Defaults are Llama's; presets below give the published shapes."""

    vocab_size: int = 32000
    embed_dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 = embed_dim // num_heads (Gemma sets it independently)
    mlp_dim: int = 11008
    activation: str = "silu"  # silu = SwiGLU (Llama/Qwen2); gelu_tanh = GeGLU (Gemma)
    norm_eps: float = 1e-5
    norm_offset: float = 0.0  # 1.0 for Gemma's RMSNorm (1 + w)
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # Qwen2
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(embed_dim)
    tie_embeddings: bool = False
    max_length: int = 4096
    # Flamingo-style gated cross-attention before every k-th layer (0 = none).
    cross_attention_every: int = 0
    media_dim: int = 0
    # Execution choices.
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    # "auto" | "xla" | "cpu" (layers.dense); "auto" follows the platform the model is built for
    dense_kernel: str = "auto"
    scan_layers: bool = True
    remat_policy: str = "none"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.embed_dim // self.num_heads


PRESETS: dict[str, dict[str, Any]] = {
    # Vicuna-7B / Llama-2-7B: 6.74B parameters.
    "llama2_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, mlp_dim=11008, norm_eps=1e-5, max_length=4096),
    "llama2_13b": dict(vocab_size=32000, embed_dim=5120, num_layers=40, num_heads=40,
                       num_kv_heads=40, mlp_dim=13824, norm_eps=1e-5, max_length=4096),
    "mistral_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32,
                       num_kv_heads=8, mlp_dim=14336, rope_theta=1e6, max_length=32768),
    "llama3_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, mlp_dim=14336, rope_theta=500000.0, max_length=8192),
    "qwen2_0_5b": dict(vocab_size=151936, embed_dim=896, num_layers=24, num_heads=14,
                       num_kv_heads=2, mlp_dim=4864, qkv_bias=True, rope_theta=1e6,
                       norm_eps=1e-6, tie_embeddings=True, max_length=32768),
    "qwen2_7b": dict(vocab_size=152064, embed_dim=3584, num_layers=28, num_heads=28,
                     num_kv_heads=4, mlp_dim=18944, qkv_bias=True, rope_theta=1e6,
                     norm_eps=1e-6, max_length=32768),
    # Gemma-2B: 2.51B parameters (PaliGemma's decoder, with a 257152-token vocabulary).
    "gemma_2b": dict(vocab_size=256000, embed_dim=2048, num_layers=18, num_heads=8,
                     num_kv_heads=1, head_dim=256, mlp_dim=16384, activation="gelu_tanh",
                     norm_eps=1e-6, norm_offset=1.0, scale_embeddings=True,
                     tie_embeddings=True, max_length=8192),
    # ~1B Llama-style decoder (the GPU benchmark's).
    "llama_1b": dict(vocab_size=32000, embed_dim=2048, num_layers=16, num_heads=16,
                     num_kv_heads=16, mlp_dim=5632, max_length=4096),
    "tiny": dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 mlp_dim=128, max_length=512),
}


def language_config(preset: str | None = None, **overrides: Any) -> LanguageConfig:
    """A LanguageConfig from a preset name plus overrides (unknown keys fail, naming the key)."""
    base = dict(PRESETS[preset]) if preset else {}
    base.update(overrides)
    return from_dict(LanguageConfig, base, where="model.language")


def _dtypes(cfg):
    return layers.to_dtype(cfg.dtype), layers.to_dtype(cfg.param_dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, writing to the KV cache when one is given."""

    cfg: LanguageConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: MaskInfo, cache_index: Array | None,
                 layer_cache: dict | None):
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        hd = cfg.resolved_head_dim
        kw = dict(dtype=dtype, param_dtype=pdtype, use_bias=cfg.qkv_bias,
                  kernel=cfg.dense_kernel)
        if self.has_variable("params", f"{FUSED_QKV}_kernel"):  # see fuse_projections
            heads = (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)
            qkv = _fused_dense(self, FUSED_QKV, x, (sum(heads), hd),
                               ("embed", "heads", "head_dim"), **kw)
            q, k, v = jnp.split(qkv, [heads[0], heads[0] + heads[1]], axis=-2)
        else:
            q = layers.dense((cfg.num_heads, hd), ("embed", "heads", "head_dim"),
                             name="q_proj", **kw)(x)
            k = layers.dense((cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"),
                             name="k_proj", **kw)(x)
            v = layers.dense((cfg.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"),
                             name="v_proj", **kw)(x)
        q = layers.apply_rope(q, positions, cfg.rope_theta)
        k = layers.apply_rope(k, positions, cfg.rope_theta)
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        new_cache = None
        if layer_cache is None:
            out = dot_product_attention(q, k, v, mask, implementation=cfg.attention)
        else:
            k, v, new_cache = _write_cache(layer_cache, k, v, cache_index)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            if cfg.attention in ("xla", "xla_autodiff"):
                out = cached_attention(q, k, v, mask)
            else:  # the fused kernels take the token-major layout
                token_major = lambda a: a.reshape(  # noqa: E731
                    q.shape[0], -1, *a.shape[1:]).swapaxes(1, 2)
                out = dot_product_attention(q, token_major(k), token_major(v), mask,
                                            implementation=cfg.attention)
        out = checkpoint_name(out, "attn_out")
        out = layers.dense(cfg.embed_dim, ("heads", "head_dim", "embed"), axis=(-2, -1),
                           dtype=dtype, param_dtype=pdtype, kernel=cfg.dense_kernel,
                           name="o_proj")(out)
        return checkpoint_name(out, "out_proj"), new_cache


# The KV cache shards like the activations: batch over the batch axes, kv heads over tensor.
# A merged [batch * kv_heads] axis (batch-major) shards over the batch axes alone.
_CACHE_AXES = {5: (None, "act_batch", "act_kv_heads", None, None),
               4: ("act_batch", "act_kv_heads", None, None),
               3: ("act_batch", None, None),
               2: ("act_batch", None)}


def _constrain_cache(buf: Array) -> Array:
    return layers.constrain(buf, _CACHE_AXES[buf.ndim])


def _write_cache(layer_cache: dict, k: Array, v: Array, index: Array):
    """Writes k, v [b, t, kv_heads, x] at cache slot `index`.

    Returns this layer's cached k, v as [b * kv_heads, len, x] (what `cached_attention` reads)
    and the new cache. A buffer is either [b * kv_heads, len, x] (an unscanned stack's own
    buffer, read by the attention dot as it is: a 4-D one would reach the dot through a bitcast,
    which XLA:CPU fuses as a second copy of the update at batch 1) or [b, kv_heads, len, x].
    A cache holding "layer" is the whole [layers, ...] stack: it is updated at that layer, so
    that inside the decode loop XLA writes the new token in place instead of copying the stack.
    """
    b, t, kvh, x = k.shape
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    merged = lambda a: a.reshape(b * kvh, a.shape[-2], x)  # noqa: E731
    if "layer" not in layer_cache:
        def put(buf, new):
            new = (merged(new) if buf.ndim == 3 else new).astype(buf.dtype)
            return _constrain_cache(
                jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=buf.ndim - 2))

        ks, vs = put(layer_cache["k"], k), put(layer_cache["v"], v)
        return merged(ks), merged(vs), {"k": ks, "v": vs}
    i = layer_cache["layer"]
    put = lambda buf, new: _constrain_cache(jax.lax.dynamic_update_slice(  # noqa: E731
        buf, new[None].astype(buf.dtype), (i, 0, 0, index, 0)))
    ks, vs = put(layer_cache["k"], k), put(layer_cache["v"], v)
    return merged(ks[i]), merged(vs[i]), dict(layer_cache, k=ks, v=vs)


FUSED_QKV, FUSED_GATE_UP = "qkv_fused", "gate_up_fused"


def fuse_projections(params: Any) -> Any:
    """`params` plus, beside every attention's q/k/v projections, their kernels (and biases)
    concatenated over heads, and beside every gated MLP's gate/up projections, theirs over the
    hidden axis. The modules then run one matmul for q, k, v and one for gate and up.

    For decoding on CPU: a step is a chain of small matmuls, and fewer, larger ones read the
    same weights ~10-20% faster there (batch 1: 6.5-7.1 ms vs 7.5-7.9 ms for this bench's
    layers). Under jit the concatenation is done once, outside the decode loop; it holds a
    second copy of those weights while it runs. Modules that never read them (a vision tower)
    leave them to dead-code elimination.
    """
    if not isinstance(params, Mapping):
        return params
    out = {k: fuse_projections(v) for k, v in params.items()}
    names = ("q_proj", "k_proj", "v_proj")
    # Self-attention only: a cross-attention's q reads another input (a different kernel shape).
    if (all(isinstance(out.get(n), Mapping) and "kernel" in out[n] for n in names)
            and len({_without(out[n]["kernel"].shape, -2) for n in names}) == 1):
        for leaf in ("kernel", "bias"):
            if all(leaf in out[n] for n in names):
                out[f"{FUSED_QKV}_{leaf}"] = jnp.concatenate([out[n][leaf] for n in names],
                                                             axis=-2)
    if (all(isinstance(out.get(n), Mapping) for n in ("gate_proj", "up_proj"))
            and out["gate_proj"]["kernel"].shape == out["up_proj"]["kernel"].shape):
        out[f"{FUSED_GATE_UP}_kernel"] = jnp.concatenate(
            [out["gate_proj"]["kernel"], out["up_proj"]["kernel"]], axis=-1)
    return out


def _without(shape: tuple, axis: int) -> tuple:
    return tuple(d for i, d in enumerate(shape) if i != axis % len(shape))


def _fused_dense(module: nn.Module, name: str, x: Array, features: Any, axes: tuple,
                 **kw: Any) -> Array:
    """The DenseGeneral that `layers.dense` builds, applied to the fused weights `name`."""
    p = {"kernel": module.get_variable("params", f"{name}_kernel")}
    if kw.get("use_bias"):
        p["bias"] = module.get_variable("params", f"{name}_bias")
    return layers.dense(features, axes, parent=None, **kw).apply({"params": p}, x)


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU feed-forward: down(act(gate(x)) * up(x))."""

    cfg: LanguageConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        kw = dict(dtype=dtype, param_dtype=pdtype, kernel=cfg.dense_kernel)
        if self.has_variable("params", f"{FUSED_GATE_UP}_kernel"):  # see fuse_projections
            both = _fused_dense(self, FUSED_GATE_UP, x, 2 * cfg.mlp_dim, ("embed", "mlp"), **kw)
            gate, up = jnp.split(both, 2, axis=-1)
        else:
            gate = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="gate_proj", **kw)(x)
            up = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = layers.activation(cfg.activation)(gate) * up
        h = layers.constrain(h, ("act_batch", "act_len", "act_mlp"))
        return layers.dense(cfg.embed_dim, ("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. Call signature fits nn.scan: (carry, *broadcast, scanned)."""

    cfg: LanguageConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, layer_cache):
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        norm = dict(eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype, param_dtype=pdtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))
        h, new_cache = Attention(cfg, name="self_attn")(
            layers.RMSNorm(name="input_norm", **norm)(x), positions, mask, cache_index,
            layer_cache)
        x = x + h
        x = x + GatedMLP(cfg, name="mlp")(layers.RMSNorm(name="post_attention_norm", **norm)(x))
        return x, new_cache


def init_cache(cfg: LanguageConfig, batch: int, length: int, dtype: Any = None) -> dict:
    """An empty KV cache for `length` tokens: k/v [layers, batch, kv_heads, length, head_dim]
    (head-major, so decode attention is a plain batched matmul; a tuple of per-layer
    [batch * kv_heads, length, head_dim] buffers for an unscanned stack), plus the positions,
    segment ids and prefix flags of the cached tokens and the write index."""
    dtype = layers.to_dtype(dtype or cfg.dtype)
    kvh, hd = cfg.num_kv_heads, cfg.resolved_head_dim
    if cfg.scan_layers or cfg.cross_attention_every:
        k = jnp.zeros((cfg.num_layers, batch, kvh, length, hd), dtype)
        v = jnp.zeros((cfg.num_layers, batch, kvh, length, hd), dtype)
    else:
        # An unscanned stack gets one [batch * kv_heads, length, head_dim] buffer per layer: its
        # attention reads the buffer it has just written in place. Layer i of a [layers, ...]
        # array is a slice, which XLA:CPU copies for the dot: 2 x 12 MB per layer and step at
        # batch 16, a third of the step.
        k = tuple(jnp.zeros((batch * kvh, length, hd), dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros((batch * kvh, length, hd), dtype) for _ in range(cfg.num_layers))
    return {
        "k": jax.tree.map(_constrain_cache, k),
        "v": jax.tree.map(_constrain_cache, v),
        "positions": _constrain_cache(jnp.zeros((batch, length), jnp.int32)),
        "segment_ids": _constrain_cache(jnp.zeros((batch, length), jnp.int32)),
        "prefix": _constrain_cache(jnp.zeros((batch, length), bool)),
        "index": jnp.zeros((), jnp.int32),
    }


class Decoder(nn.Module):
    """Token embedding, the layer stack (optionally with gated cross-attention) and the LM head."""

    cfg: LanguageConfig

    def setup(self):
        cfg = self.cfg
        dtype, pdtype = _dtypes(cfg)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=pdtype,
            embedding_init=layers.param_init(nn.initializers.normal(0.02), ("vocab", "embed")))
        self.final_norm = layers.RMSNorm(eps=cfg.norm_eps, offset=cfg.norm_offset, dtype=dtype,
                                         param_dtype=pdtype)
        if not cfg.tie_embeddings:
            self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                                        param_dtype=pdtype, kernel=cfg.dense_kernel)
        if cfg.cross_attention_every:
            from lvlm_jax.models.connectors import FlamingoGroup

            if cfg.num_layers % cfg.cross_attention_every:
                raise ValueError(
                    f"num_layers={cfg.num_layers} is not a multiple of "
                    f"cross_attention_every={cfg.cross_attention_every}")
            n = cfg.num_layers // cfg.cross_attention_every
            self.stack = _make_stack(FlamingoGroup, cfg, n, "groups", with_media=True)
        else:
            self.stack = _make_stack(DecoderLayer, cfg, cfg.num_layers, "layers")

    def embed(self, ids: Array) -> Array:
        """Token embeddings, before Gemma's sqrt(d) scaling (which applies in __call__)."""
        return self.embed_tokens(ids)

    def __call__(self, embeddings: Array, positions: Array, segment_ids: Array,
                 prefix_mask: Array | None = None, cache: dict | None = None,
                 media: tuple | None = None, return_hidden: bool = False,
                 plain_causal: bool = False):
        """embeddings [b, t, d] -> (logits [b, t, vocab] or final hidden states, new cache).

        segment_ids: 0 marks padding; packed samples carry distinct ids. prefix_mask: True on
        prefix-LM prefix tokens. With a cache, the t tokens are written at cache["index"] and
        attend to everything cached before them.
        """
        cfg = self.cfg
        x = embeddings
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.embed_dim ** 0.5, x.dtype)
        x = layers.constrain(x, ("act_batch", "act_len", "act_embed"))
        if cache is None:
            mask = MaskInfo.for_sequence(segment_ids, positions, prefix_mask,
                                         plain_causal=plain_causal)
            cache_index, layer_caches = None, None
        else:
            idx = cache["index"]
            put = lambda buf, new: _constrain_cache(  # noqa: E731
                jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), idx, axis=1))
            prefix = jnp.zeros_like(segment_ids, bool) if prefix_mask is None else prefix_mask
            meta = {"positions": put(cache["positions"], positions),
                    "segment_ids": put(cache["segment_ids"], segment_ids),
                    "prefix": put(cache["prefix"], prefix)}
            mask = MaskInfo(segment_ids, meta["segment_ids"], positions, meta["positions"],
                            prefix, meta["prefix"])
            cache_index, layer_caches = idx, {"k": cache["k"], "v": cache["v"]}
            if cfg.cross_attention_every:
                g = cfg.cross_attention_every
                layer_caches = jax.tree.map(
                    lambda a: a.reshape(a.shape[0] // g, g, *a.shape[1:]), layer_caches)
        x, new_layer_caches = self.stack(x, positions, mask, cache_index, layer_caches, media)
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            new_layer_caches = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]),
                                            new_layer_caches) if cfg.cross_attention_every \
                else new_layer_caches
            new_cache = dict(meta, **new_layer_caches, index=idx + x.shape[1])
        if return_hidden:
            return x, new_cache
        return self.logits_from_hidden(x), new_cache

    def logits_from_hidden(self, x: Array) -> Array:
        if self.cfg.tie_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        return layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))


class _Unscanned(nn.Module):
    """Applies `n` layers in a Python loop; layer i's params live under `{prefix}_{i}`."""

    block: Any
    cfg: Any
    n: int
    prefix: str
    with_media: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, layer_caches, media):
        if layer_caches is not None and isinstance(layer_caches["k"], tuple | list):
            ks, vs = [], []
            for i in range(self.n):
                x, c = self.block(self.cfg, name=f"{self.prefix}_{i}")(
                    x, positions, mask, cache_index,
                    {"k": layer_caches["k"][i], "v": layer_caches["v"][i]})
                ks.append(c["k"])
                vs.append(c["v"])
            return x, {"k": tuple(ks), "v": tuple(vs)}
        if layer_caches is not None and not self.with_media:
            cache = layer_caches
            for i in range(self.n):
                x, cache = self.block(self.cfg, name=f"{self.prefix}_{i}")(
                    x, positions, mask, cache_index, dict(cache, layer=i))
            return x, {"k": cache["k"], "v": cache["v"]}
        new = []
        for i in range(self.n):
            lc = None if layer_caches is None else jax.tree.map(lambda a: a[i], layer_caches)
            extra = (media,) if self.with_media else ()
            x, c = self.block(self.cfg, name=f"{self.prefix}_{i}")(
                x, positions, mask, cache_index, lc, *extra)
            new.append(c)
        if layer_caches is None:
            return x, None
        return x, jax.tree.map(lambda *a: jnp.stack(a), *new)


class _Scanned(nn.Module):
    """Applies `n` layers with nn.scan; params stacked on a leading axis named 'layers'."""

    block: Any
    cfg: Any
    n: int
    prefix: str
    with_media: bool = False

    @nn.compact
    def __call__(self, x, positions, mask, cache_index, layer_caches, media):
        if layer_caches is not None and not self.with_media:
            return _scan_carrying_cache(self.block(self.cfg, name=self.prefix), self.n, x,
                                        positions, mask, cache_index, layer_caches)
        bcast = (nn.broadcast,) * (4 if self.with_media else 3)
        scanned = nn.scan(
            self.block,
            variable_axes=layers.SCANNED_COLLECTIONS,
            split_rngs={"params": True, "dropout": True},
            in_axes=bcast[:3] + (0,) + bcast[3:],
            length=self.n,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        extra = (media,) if self.with_media else ()
        return scanned(self.cfg, name=self.prefix)(x, positions, mask, cache_index, layer_caches,
                                                   *extra)


def _scan_carrying_cache(block, n, x, positions, mask, cache_index, layer_caches):
    """Decoding with a scanned stack: the whole cache rides in the scan carry and each layer
    writes its slot in place (as a scanned output it would be re-stacked, a full copy, every
    step). `block` is the same named module the training path scans: same param layout."""

    def body(block, carry, positions, mask, cache_index):
        x, cache = carry
        x, cache = block(x, positions, mask, cache_index, cache)
        return (x, dict(cache, layer=cache["layer"] + 1)), None

    scan = nn.scan(body, variable_axes=layers.SCANNED_COLLECTIONS,
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast,) * 3, length=n,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    cache = dict(layer_caches, layer=jnp.zeros((), jnp.int32))
    (x, cache), _ = scan(block, (x, cache), positions, mask, cache_index)
    return x, {"k": cache["k"], "v": cache["v"]}


def _make_stack(block, cfg, n, prefix, with_media=False):
    block = layers.maybe_remat(block, cfg.remat_policy, cfg.scan_layers)
    cls = _Scanned if cfg.scan_layers else _Unscanned
    return cls(block=block, cfg=cfg, n=n, prefix=prefix, with_media=with_media)
