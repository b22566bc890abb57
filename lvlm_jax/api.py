"""The Python API: `lvlm_jax.from_pretrained(path)`, a handle that runs a model on HF-layout arrays.

    vlm = lvlm_jax.from_pretrained("llava-1.5-7b-hf")
    logits = vlm.logits(input_ids, pixel_values)            # what transformers' forward gives
    ids = vlm.generate_ids(input_ids, pixel_values, 32)     # what generate(do_sample=False) gives

Arrays are numpy in the layout of HF processors: `pixel_values` [images, C, H, W] (normalised),
images in order over the batch; `input_ids` with the image placeholder repeated once per image
token, so the same arrays feed transformers and us. Any-res models (LLaVA-NeXT, OneVision) take
`pixel_values` [images, crops, C, H, W] with `image_sizes` [images, 2], video models
`pixel_values_videos` [videos, frames, C, H, W], exactly as their HF processors return them:

    logits = vlm.logits(ids, pixel_values, image_sizes=sizes, pixel_values_videos=clips)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax.checkpoints.hf import import_hf, read_hf_config
from lvlm_jax.generate import generate_tokens
from lvlm_jax.hf_media import hf_media_layout
from lvlm_jax.models.vlm import VLM, VLMConfig, build_model, vlm_config
from lvlm_jax.models.vlm import with_unscanned_decoder as unscanned_decoder


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model: VLM, params: Any, ids, pixels, seg, pos, prefix) -> jax.Array:
    # Module-level, keyed on the (hashable) model: handles of one architecture share a compile.
    return model.apply({"params": params}, ids, pixels, segment_ids=seg, positions=pos,
                       prefix_mask=prefix)[0]


@dataclasses.dataclass
class VLMHandle:
    """A loaded model: `config`, `params` (below "params"), `model`, and numpy-in/out calls."""

    config: VLMConfig
    params: Any
    model: VLM
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    # PaliGemma counts positions from 1; RoPE is relative, but matching it keeps logits exact.
    position_offset: int = 0

    def _pixels(self, input_ids: np.ndarray, pixel_values: np.ndarray | None
                ) -> np.ndarray | None:
        """HF [images, C, H, W] -> ours [batch, max images per row, H, W, C] (zeros pad rows)."""
        per_image = self.config.image_tokens
        counts = (input_ids == self.config.image_token_id).sum(axis=1)
        if pixel_values is None:
            if counts.any():
                raise ValueError(f"input_ids hold {counts.sum()} image placeholders but no "
                                 "pixel_values were given")
            return None
        if np.any(counts % per_image):
            raise ValueError(f"rows hold {counts.tolist()} image placeholders: not multiples "
                             f"of the {per_image} tokens of one image")
        n_images = counts // per_image
        if n_images.sum() != len(pixel_values):
            raise ValueError(f"input_ids hold placeholders for {n_images.sum()} images but "
                             f"pixel_values has {len(pixel_values)}")
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be [images, 3, {size}, {size}], got "
                             f"{pixel_values.shape}")
        nhwc = np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)
        out = np.zeros((len(input_ids), max(int(n_images.max()), 1), size, size, 3), np.float32)
        start = np.concatenate([[0], np.cumsum(n_images)])
        for row, n in enumerate(n_images):
            out[row, :n] = nhwc[start[row]:start[row] + n]
        return out

    def _media(self, ids: np.ndarray, pixel_values: np.ndarray | None,
               image_sizes: np.ndarray | None, pixel_values_videos: np.ndarray | None,
               batch_num_images: np.ndarray | None) -> Any:
        """The model's pixel input: a MediaLayout for any-res / video models, else dense."""
        cfg = self.config
        if (cfg.image_newline or cfg.video_token_id >= 0 or image_sizes is not None
                or pixel_values_videos is not None):
            return hf_media_layout(cfg, ids, pixel_values, image_sizes, pixel_values_videos,
                                   batch_num_images)
        return self._pixels(ids, pixel_values)

    def logits(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None,
               token_type_ids: np.ndarray | None = None,
               attention_mask: np.ndarray | None = None, *,
               image_sizes: np.ndarray | None = None,
               pixel_values_videos: np.ndarray | None = None,
               batch_num_images: np.ndarray | None = None) -> np.ndarray:
        """[batch, length, vocab] float32 logits, as transformers' forward gives them.

        `attention_mask` (1 = token, 0 = padding) allows left-padded batches. For a prefix-LM
        (PaliGemma), `token_type_ids` 0 marks the bidirectional prefix; without them the whole
        input is prefix, as in transformers. Any-res and video models take their processor's
        `image_sizes`, `pixel_values_videos` and (OneVision) `batch_num_images` as well.
        """
        ids = np.asarray(input_ids, np.int32)
        seg = (np.ones_like(ids) if attention_mask is None
               else np.asarray(attention_mask, np.int32))
        pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0) + self.position_offset
        prefix = None
        if self.config.prefix_lm:
            prefix = (np.ones(ids.shape, bool) if token_type_ids is None
                      else np.asarray(token_type_ids) == 0)
        pixels = self._media(ids, pixel_values, image_sizes, pixel_values_videos,
                             batch_num_images)
        out = _forward(self.model, self.params, ids, pixels, seg, pos.astype(np.int32), prefix)
        return np.asarray(out, np.float32)

    def generate_ids(self, input_ids: np.ndarray, pixel_values: np.ndarray | None = None,
                     max_new_tokens: int = 32, attention_mask: np.ndarray | None = None, *,
                     image_sizes: np.ndarray | None = None,
                     pixel_values_videos: np.ndarray | None = None,
                     batch_num_images: np.ndarray | None = None) -> np.ndarray:
        """Greedy decoding, shaped like transformers' generate(do_sample=False): the prompt
        followed by the new tokens, rows that stopped at EOS padded with the pad id, and no
        columns after every row has stopped. Prompts are left-padded (`attention_mask`); for a
        prefix-LM the whole prompt is the prefix, as PaliGemma's processor makes it. Any-res
        and video inputs as in `logits`: they enter at prefill only."""
        ids = np.asarray(input_ids, np.int32)
        seg = (np.ones_like(ids) if attention_mask is None
               else np.asarray(attention_mask, np.int32))
        pixels = self._media(ids, pixel_values, image_sizes, pixel_values_videos,
                             batch_num_images)
        out = generate_tokens(self.model, self.params, jnp.asarray(ids), jnp.asarray(seg),
                              None if pixels is None else jax.tree.map(jnp.asarray, pixels),
                              jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                              stop_ids=self.eos_token_ids, pad_id=self.pad_token_id,
                              prefix_lm=self.config.prefix_lm)
        tokens = np.asarray(out["tokens"])[:, :int(np.max(out["lengths"]))]
        return np.concatenate([ids, tokens.astype(ids.dtype)], axis=1)


def _token_ids(path: str, hf: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """EOS ids and pad id as transformers' generate takes them: generation_config.json first,
    then the text config."""
    ids = dict(hf.get("text_config") or hf)
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path, encoding="utf-8") as f:
            gen = json.load(f)
        ids.update({k: gen[k] for k in ("eos_token_id", "pad_token_id") if k in gen})
    eos = ids.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    pad = ids.get("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0  # transformers pads with the first EOS id when it has no pad
    return eos, int(pad)


def with_unscanned_decoder(vlm: VLMHandle) -> VLMHandle:
    """The same model with its decoder's layers unstacked (`models.vlm.with_unscanned_decoder`):
    ~1.5x faster decoding on CPU. Cross-attention (Flamingo) decoders and unscanned ones are
    returned as they are."""
    model, params = unscanned_decoder(vlm.model, vlm.params)
    if model is vlm.model:
        return vlm
    return dataclasses.replace(vlm, config=dataclasses.replace(
        vlm.config, language=dataclasses.replace(vlm.config.language, scan_layers=False)),
        params=params, model=model)


def from_pretrained(path: str, *, scan_layers: bool = True, platform: str | None = None
                    ) -> VLMHandle:
    """Loads an HF LLaVA (-NeXT, -NeXT-Video, -OneVision), PaliGemma or DeepSeek-VL folder, one
    of our params-only checkpoints (`lvlm export --format=params`, `lvlm import`) or a training
    workdir into a `VLMHandle`.

    The params go to the default device; the model's "auto" kernels are chosen for `platform`
    (default: that device's platform)."""
    import os

    platform = platform or jax.devices()[0].platform

    from lvlm_jax.checkpoints.export import MODEL_CONFIG, load_params_only, read_model_config

    if os.path.exists(os.path.join(path, MODEL_CONFIG)):
        if os.path.isdir(os.path.join(path, "params")):
            cfg, params = load_params_only(path)
        else:  # a training workdir: its latest checkpoint
            from lvlm_jax.checkpoints.manager import restore_params

            cfg, (params, _) = read_model_config(path), restore_params(path)
        from lvlm_jax.train.lora import merge

        params = merge(params)  # a LoRA run's adapters, folded into its kernels
        return VLMHandle(config=cfg, params=jax.device_put(params),
                         model=build_model(cfg, platform))
    hf = read_hf_config(path)
    cfg_dict, params = import_hf(path, scan_layers=scan_layers)
    if "connector" not in cfg_dict:
        raise ValueError(f"{path} holds a single tower, not a vision-language model; use "
                         "lvlm_jax.checkpoints.hf.import_hf to load it")
    cfg = vlm_config(cfg_dict)
    eos, pad = _token_ids(path, hf)
    return VLMHandle(config=cfg, params=jax.device_put(params), model=build_model(cfg, platform),
                     hf_config=hf, eos_token_ids=eos, pad_token_id=pad,
                     position_offset=1 if cfg.prefix_lm else 0)
