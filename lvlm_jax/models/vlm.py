"""The assembled LVLM: pixels -> vision -> connector -> merged into the token stream -> decoder.

Images are spliced into the token embeddings at the image-placeholder positions (any number of
images per row, interleaved with text: the k-th placeholder of a row takes the k-th image token of
that row's images, in order), or, for the cross-attention connector, attended to from inside the
decoder. Pixels are [batch, images, height, width, channels] floats, already normalised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvlm_jax.models import layers
from lvlm_jax.models.config_utils import from_dict
from lvlm_jax.models.connectors import ConnectorConfig, Projector, Resampler, connector_config
from lvlm_jax.models.language import Decoder, LanguageConfig, init_cache, language_config
from lvlm_jax.models.media_layout import MediaLayout, merge_media
from lvlm_jax.models.vision import VisionConfig, VisionEncoder, vision_config

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig
    language: LanguageConfig
    connector: ConnectorConfig
    image_token_id: int = 0  # the placeholder id (projector/resampler) or media marker (xattn)
    prefix_lm: bool = False  # PaliGemma: image + prompt attend bidirectionally
    # LLaVA-NeXT / OneVision any-res (models/media_layout.py): the learned newline after each
    # row of tile features, the grids the host tiles into ((h, w) pixel pairs), OneVision's
    # anyres_max_N cap on tile features (0: none).
    image_newline: bool = False
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    max_num_patches: int = 0
    # Video: its placeholder id (-1: no video), and the frames' spatial pooling: "average"
    # (LLaVA-NeXT-Video: stride x stride mean before the projector), "bilinear" (OneVision:
    # after the projector, to ceil(side / 2), one newline per clip) or "none".
    video_token_id: int = -1
    video_pool: str = "none"
    video_pool_stride: int = 2

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens per image in the input ids (0 for cross-attention)."""
        if self.connector.kind == "projector":
            return self.vision.num_tokens
        if self.connector.kind == "resampler":
            return self.connector.num_queries
        return 0

    @property
    def decoder_config(self) -> LanguageConfig:
        if self.connector.kind != "cross_attention":
            return self.language
        media_dim = (self.connector.width if self.connector.num_queries
                     else self.vision.width)
        return dataclasses.replace(self.language, media_dim=media_dim,
                                   cross_attention_every=self.connector.cross_attention_every)


def normalize_pixels(pixels: jax.Array, mean, std) -> jax.Array:
    """uint8 (or [0, 1] float) pixels -> the float input the vision tower was trained on."""
    x = pixels.astype(jnp.float32)
    if pixels.dtype == jnp.uint8:
        x = x / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def vlm_config(values: Mapping[str, Any]) -> VLMConfig:
    """A VLMConfig from a nested dict / ConfigDict: {vision, language, connector, ...}.

    `vision` and `language` may name a `preset` (e.g. 'clip_l14_336', 'llama2_7b') plus overrides.
    """
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    values = dict(values)
    sub = {}
    for key, build in (("vision", vision_config), ("language", language_config)):
        d = dict(values.pop(key, {}) or {})
        preset = d.pop("preset", None)
        sub[key] = build(preset, **d)
    sub["connector"] = connector_config(**dict(values.pop("connector", {}) or {}))
    if "image_grid_pinpoints" in values:  # lists from JSON / ConfigDict -> hashable pairs
        values["image_grid_pinpoints"] = tuple(
            (int(h), int(w)) for h, w in values["image_grid_pinpoints"] or ())
    cfg = from_dict(VLMConfig, dict(values, **sub), where="model")
    if cfg.video_pool not in ("none", "average", "bilinear"):
        raise ValueError(f"model.video_pool must be 'none', 'average' or 'bilinear', got "
                         f"{cfg.video_pool!r}")
    return cfg


def default_positions(segment_ids: Array) -> Array:
    """Positions that restart at 0 at the start of every segment (packed rows)."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def merge_image_features(embeds: Array, input_ids: Array, features: Array,
                         image_token_id: int) -> Array:
    """Puts the k-th image token of each row at the row's k-th placeholder.

    embeds [b, t, d]; features [b, images, tokens, d] -> [b, t, d].
    """
    b, n, m, d = features.shape
    flat = features.reshape(b, n * m, d).astype(embeds.dtype)
    is_img = input_ids == image_token_id
    slot = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, n * m - 1)
    gathered = jnp.take_along_axis(flat, slot[..., None], axis=1)
    return jnp.where(is_img[..., None], gathered, embeds)


def media_ids_from_markers(input_ids: Array, marker_id: int) -> Array:
    """For cross-attention: each token attends to the most recent image before it (-1: none)."""
    return jnp.cumsum(input_ids == marker_id, axis=1) - 1


class VLM(nn.Module):
    """The whole model. `__call__` returns (logits or hidden states, new KV cache or None)."""

    cfg: VLMConfig

    def setup(self):
        cfg = self.cfg
        dtype = layers.to_dtype(cfg.language.dtype)
        pdtype = layers.to_dtype(cfg.language.param_dtype)
        self.vision = VisionEncoder(cfg.vision)
        self.decoder = Decoder(cfg.decoder_config)
        kind = cfg.connector.kind
        dk = cfg.language.dense_kernel
        if kind == "projector":
            self.connector = Projector(cfg.connector, cfg.language.embed_dim, dtype, pdtype, dk)
        elif kind == "resampler":
            self.connector = Resampler(cfg.connector, cfg.language.embed_dim,
                                       cfg.language.vocab_size, dtype, pdtype, dk)
        elif cfg.connector.num_queries:
            self.connector = Resampler(cfg.connector, cfg.connector.width,
                                       cfg.language.vocab_size, dtype, pdtype, dk)
        else:
            self.connector = None
        if cfg.image_newline:
            d = cfg.language.embed_dim
            self.image_newline = self.param(
                "image_newline", nn.with_logical_partitioning(
                    nn.initializers.normal(d ** -0.5), ("embed",)), (d,), pdtype)

    def media_table(self, pixels: Array) -> Array:
        """Crops [groups, crops, S, S, 3] -> each group's table of LM-ready rows [groups, L, d]
        (layout in models/media_layout.py): projected crop tokens, pooled ones when the model
        pools video before its projector, the newline."""
        cfg = self.cfg
        if not isinstance(self.connector, Projector):
            raise ValueError("flattened media (MediaLayout) need a projector connector, not "
                             f"{cfg.connector.kind!r}")
        g, c = pixels.shape[:2]
        feats = self.vision(pixels.reshape(g * c, *pixels.shape[2:]))
        if isinstance(feats, tuple):
            feats = feats[0]
        parts = [self.connector(feats).reshape(g, -1, cfg.language.embed_dim)]
        if cfg.video_pool == "average":
            s = cfg.video_pool_stride
            side = math.isqrt(feats.shape[1])
            p = side // s
            grid = feats.reshape(g * c, side, side, -1)[:, :p * s, :p * s]
            pooled = grid.reshape(g * c, p, s, p, s, -1).mean(axis=(2, 4))
            parts.append(self.connector(pooled.reshape(g * c, p * p, -1)).reshape(
                g, -1, cfg.language.embed_dim))
        newline = (self.image_newline if cfg.image_newline
                   else jnp.zeros((cfg.language.embed_dim,), parts[0].dtype))
        parts.append(jnp.broadcast_to(newline.astype(parts[0].dtype), (g, 1, newline.shape[0])))
        return jnp.concatenate(parts, axis=1)

    def encode_images(self, pixel_values: Array, instruction: Array | None = None,
                      instruction_mask: Array | None = None) -> Array:
        """[b, n, h, w, c] -> [b, n, tokens, d]: LM-ready image tokens (or media for xattn)."""
        b, n = pixel_values.shape[:2]
        feats = self.vision(pixel_values.reshape(b * n, *pixel_values.shape[2:]))
        if isinstance(feats, tuple):
            feats = feats[0]
        if isinstance(self.connector, Resampler):
            if instruction is not None:
                instruction = jnp.repeat(instruction, n, axis=0)
                if instruction_mask is not None:
                    instruction_mask = jnp.repeat(instruction_mask, n, axis=0)
            feats = self.connector(feats, instruction, instruction_mask)
        elif self.connector is not None:
            feats = self.connector(feats)
        return feats.reshape(b, n, *feats.shape[1:])

    def __call__(
        self,
        input_ids: Array,
        pixel_values: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        prefix_mask: Array | None = None,
        cache: dict | None = None,
        image_features: Array | None = None,
        media_ids: Array | None = None,
        instruction: Array | None = None,
        instruction_mask: Array | None = None,
        return_hidden: bool = False,
        plain_causal: bool = False,
    ):
        # Under jax.jvp, the whole model (scan and remat bodies included) takes the paths
        # autodiff can differentiate forward; see layers.forward_mode.
        jvp = layers.forward_mode(input_ids, pixel_values, image_features,
                                  dict(self.variables))
        with layers.forward_mode_scope(jvp):
            return self._forward(input_ids, pixel_values, segment_ids, positions, prefix_mask,
                                 cache, image_features, media_ids, instruction,
                                 instruction_mask, return_hidden, plain_causal)

    def _forward(self, input_ids, pixel_values, segment_ids, positions, prefix_mask, cache,
                 image_features, media_ids, instruction, instruction_mask, return_hidden,
                 plain_causal):
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids)
        if positions is None:
            positions = default_positions(segment_ids)
        embeds, media = self.embed_inputs(input_ids, pixel_values, image_features=image_features,
                                          media_ids=media_ids, instruction=instruction,
                                          instruction_mask=instruction_mask)
        if cfg.prefix_lm and prefix_mask is None:
            prefix_mask = jnp.ones_like(input_ids, bool)  # HF: no token types = all prefix
        return self.decoder(embeds, positions, segment_ids, prefix_mask, cache, media,
                            return_hidden=return_hidden, plain_causal=plain_causal)

    def embed_inputs(self, input_ids: Array, pixel_values: Array | None = None, *,
                     image_features: Array | None = None, media_ids: Array | None = None,
                     instruction: Array | None = None, instruction_mask: Array | None = None):
        """Token embeddings with image tokens merged in -> (embeddings, media for xattn or None)."""
        cfg = self.cfg
        if isinstance(pixel_values, MediaLayout):
            slots = pixel_values.slots
            embeds = self.decoder.embed(jnp.where(slots[..., 0] >= 0, 0, input_ids))
            table = self.media_table(pixel_values.pixels)
            return merge_media(embeds, table, slots, pixel_values.weights), None
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values, instruction, instruction_mask)
        media = None
        if cfg.connector.kind == "cross_attention":
            ids = input_ids
            embeds = self.decoder.embed(ids)
            if image_features is not None:
                if media_ids is None:
                    media_ids = media_ids_from_markers(input_ids, cfg.image_token_id)
                b, n, m, d = image_features.shape
                flat = image_features.reshape(b, n * m, d)
                img_of_token = jnp.repeat(jnp.arange(n), m)  # [n*m]
                media_mask = media_ids[:, :, None] == img_of_token[None, None, :]
                media = (flat, media_mask)
            else:
                media = (jnp.zeros((*input_ids.shape[:1], 1, cfg.decoder_config.media_dim),
                                   embeds.dtype), jnp.zeros((*input_ids.shape, 1), bool))
        else:
            is_img = input_ids == cfg.image_token_id
            embeds = self.decoder.embed(jnp.where(is_img, 0, input_ids))
            if image_features is not None:
                embeds = merge_image_features(embeds, input_ids, image_features,
                                              cfg.image_token_id)
        return embeds, media

    def init_cache(self, batch: int, length: int) -> dict:
        return init_cache(self.cfg.decoder_config, batch, length)


def with_unscanned_decoder(model: VLM, params: Any) -> tuple[VLM, Any]:
    """The same model with its decoder's layers unstacked (`layers_0`, `layers_1`, ...), and
    its params so laid out. On CPU an unrolled decoder decodes ~1.3-1.5x faster than a scanned
    one, which slices each layer's weights and KV cache every step (bench/results/generate.txt,
    eval_throughput.txt). Cross-attention (Flamingo) and unscanned decoders are returned as
    they are. The model keeps the kernels it was built with."""
    from lvlm_jax.models.scan_utils import unstack_layers

    cfg = model.cfg
    if not cfg.language.scan_layers or cfg.connector.kind == "cross_attention":
        return model, params
    unscanned = dataclasses.replace(
        cfg, language=dataclasses.replace(cfg.language, scan_layers=False))
    decoder = nn.meta.unbox(params["decoder"])  # boxed as `model.init` gives them, or plain
    return VLM(unscanned), dict(params, decoder=unstack_layers(dict(decoder)))


def for_platform(cfg: VLMConfig, platform: str) -> VLMConfig:
    """`cfg` with its "auto" kernel choices made for `platform` ("cpu", "tpu", "gpu"): the
    platform of the devices the program will run on (a mesh's, an AOT target's), never the
    backend of the host that traces it. Explicit choices are kept."""
    def resolve(tower):
        if tower.dense_kernel != "auto":
            return tower
        return dataclasses.replace(tower, dense_kernel="cpu" if platform == "cpu" else "xla")

    return dataclasses.replace(cfg, vision=resolve(cfg.vision), language=resolve(cfg.language))


def build_model(cfg: VLMConfig | Mapping[str, Any], platform: str | None = None) -> VLM:
    """The VLM of `cfg`; with `platform`, its "auto" kernels are chosen for that platform
    (see `for_platform`), else they take the portable path."""
    cfg = cfg if isinstance(cfg, VLMConfig) else vlm_config(cfg)
    return VLM(cfg if platform is None else for_platform(cfg, platform))


def instruction_inputs(cfg: VLMConfig, input_ids: Array, prompt: Array) -> dict[str, Array]:
    """An instruction-aware resampler's text (InstructBLIP): the tokens where `prompt` is True,
    image placeholders left out, left-aligned and cut to max_instruction_len -> {"instruction",
    "instruction_mask"}; {} for every other connector. Training and generation both use it, so
    the queries see the same instruction in both."""
    connector = cfg.connector
    if not getattr(connector, "instruction_aware", False):
        return {}
    keep = prompt & (input_ids != cfg.image_token_id)
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :connector.max_instruction_len]
    mask = jnp.take_along_axis(keep, order, axis=1)
    return {"instruction": jnp.where(mask, jnp.take_along_axis(input_ids, order, axis=1), 0),
            "instruction_mask": mask}


def dummy_inputs(cfg: VLMConfig, batch: int = 1, length: int | None = None,
                 images: int = 1) -> dict[str, Array]:
    """Shape-only inputs for init / eval_shape."""
    length = length or max(cfg.image_tokens * images + 8, 16)
    v = cfg.vision
    out = {
        "input_ids": jnp.zeros((batch, length), jnp.int32),
        "pixel_values": jnp.zeros((batch, images, v.image_size, v.image_size, 3), jnp.float32),
    }
    if cfg.connector.instruction_aware:
        out["instruction"] = jnp.zeros((batch, 8), jnp.int32)
    return out
