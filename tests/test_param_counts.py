"""Real-size models have their published parameter counts, found by jax.eval_shape alone."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lvlm_jax.models import (
    Decoder,
    VisionEncoder,
    build_model,
    dummy_inputs,
    language_config,
    vision_config,
    vlm_config,
)

LLAVA15_7B = {"vision": {"preset": "clip_l14_336", "feature_layer": -2},
              "language": {"preset": "llama2_7b"},
              "connector": {"kind": "projector", "projector": "mlp2x_gelu"},
              "image_token_id": 32000}
LLAVA15_13B = dict(LLAVA15_7B, language={"preset": "llama2_13b"})
PALIGEMMA_3B = {"vision": {"preset": "siglip_so400m14_224"},
                "language": {"preset": "gemma_2b", "vocab_size": 257152},
                "connector": {"kind": "projector", "projector": "linear",
                              "scale_by_inverse_sqrt_embed": True},
                "image_token_id": 257152, "prefix_lm": True}

# HF configs of the same shapes, for exact counts (models built on torch's meta device).
HF_CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
HF_SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                    "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                    "vision_use_head": False}  # PaliGemma's tower has no pooling head
HF_LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
HF_LLAMA2_13B = {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                 "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40}
HF_GEMMA_2B = {"vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
               "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1,
               "head_dim": 256, "tie_word_embeddings": True}
HF_MISTRAL_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
HF_LLAMA3_8B = dict(HF_MISTRAL_7B, vocab_size=128256)
HF_QWEN2_0_5B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                 "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                 "tie_word_embeddings": True}
HF_QWEN2_7B = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
               "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
               "tie_word_embeddings": False}


def _count(variables) -> int:
    """Parameters in an eval_shape'd variable tree, checking that none was materialised."""
    leaves = jax.tree.leaves(nn.meta.unbox(variables["params"]))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    return sum(math.prod(x.shape) for x in leaves)


def _abstract_init(module, *args, **kwargs):
    """module.init under eval_shape; the key and the inputs are abstract too."""
    return jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a, **kwargs), *args)


def vlm_params(values) -> int:
    cfg = vlm_config(values)
    model = build_model(cfg)
    inputs = jax.eval_shape(lambda: dummy_inputs(cfg, batch=1))
    return _count(jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), **x), inputs))


def vision_params(preset: str, **overrides) -> int:
    cfg = vision_config(preset, **overrides)
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return _count(_abstract_init(VisionEncoder(cfg), images))


def decoder_params(preset: str, **overrides) -> int:
    cfg = language_config(preset, **overrides)

    def embed_and_decode(decoder, ids):
        # Decoder.__call__ takes embeddings; embedding the ids first creates the token table
        # even when the LM head is untied.
        ones = jnp.ones_like(ids)
        return decoder(decoder.embed(ids), jnp.cumsum(ones, axis=1) - 1, ones)

    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return _count(_abstract_init(Decoder(cfg), ids, method=embed_and_decode))


def hf_params(model_cls: str, config_cls: str, **config) -> int:
    """Exact count of a transformers model built on the meta device (nothing allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def hf_llava_params(text_config: dict) -> int:
    transformers = pytest.importorskip("transformers")
    return hf_params("LlavaForConditionalGeneration", "LlavaConfig",
                     vision_config=transformers.CLIPVisionConfig(**HF_CLIP_L14_336),
                     text_config=transformers.LlamaConfig(**text_config),
                     image_token_index=32000, vision_feature_layer=-2,
                     projector_hidden_act="gelu")


def _assert_published(count: int, published: float):
    assert abs(count - published) <= 0.01 * published, f"{count:,} vs published {published:,.0f}"


def _assert_same_as_hf(count: int, hf_count: int):
    assert count == hf_count, f"{count:,} parameters vs HF's {hf_count:,} ({count - hf_count:+,})"


def test_eval_shape_materialises_no_parameters():
    before = {id(x) for x in jax.live_arrays()}
    cfg = vlm_config(LLAVA15_7B)
    inputs = jax.eval_shape(lambda: dummy_inputs(cfg, batch=1))
    model = build_model(cfg)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), **x), inputs)
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves(nn.meta.unbox(variables)))
    assert not [x for x in jax.live_arrays() if id(x) not in before]


def test_llava15_7b_matches_published_size():
    _assert_published(vlm_params(LLAVA15_7B), 7.06e9)


def test_llava15_13b_matches_published_size():
    _assert_published(vlm_params(LLAVA15_13B), 13.35e9)


def test_paligemma_3b_matches_published_size():
    _assert_published(vlm_params(PALIGEMMA_3B), 2.92e9)


def test_clip_l14_vision_tower_matches_published_size():
    _assert_published(vision_params("clip_l14_336", feature_layer=-2), 303.5e6)


@pytest.mark.parametrize("preset, published", [
    ("llama2_7b", 6.74e9),  # Llama-2-7B / Vicuna-7B
    ("llama2_13b", 13.02e9),
    ("mistral_7b", 7.24e9),
    ("llama3_8b", 8.03e9),
    ("qwen2_0_5b", 0.49e9),
    ("qwen2_7b", 7.62e9),
    ("gemma_2b", 2.51e9),
])
def test_language_tower_matches_published_size(preset, published):
    _assert_published(decoder_params(preset), published)


def test_llava15_7b_matches_hf_exactly():
    _assert_same_as_hf(vlm_params(LLAVA15_7B), hf_llava_params(HF_LLAMA2_7B))


def test_llava15_13b_matches_hf_exactly():
    _assert_same_as_hf(vlm_params(LLAVA15_13B), hf_llava_params(HF_LLAMA2_13B))


def test_paligemma_3b_matches_hf_exactly():
    transformers = pytest.importorskip("transformers")
    expected = hf_params("PaliGemmaForConditionalGeneration", "PaliGemmaConfig",
                         vision_config=transformers.SiglipVisionConfig(**HF_SIGLIP_SO400M),
                         text_config=transformers.GemmaConfig(
                             **dict(HF_GEMMA_2B, vocab_size=257152)),
                         projection_dim=2048, image_token_index=257152)
    _assert_same_as_hf(vlm_params(PALIGEMMA_3B), expected)


@pytest.mark.parametrize("preset, model_cls, config_cls, hf_config", [
    ("clip_l14_336", "CLIPVisionModel", "CLIPVisionConfig", HF_CLIP_L14_336),
    ("siglip_so400m14_224", "SiglipVisionModel", "SiglipVisionConfig", HF_SIGLIP_SO400M),
])
def test_vision_tower_matches_hf_exactly(preset, model_cls, config_cls, hf_config):
    _assert_same_as_hf(vision_params(preset), hf_params(model_cls, config_cls, **hf_config))


@pytest.mark.parametrize("preset, model_cls, config_cls, hf_config", [
    ("llama2_7b", "LlamaForCausalLM", "LlamaConfig", HF_LLAMA2_7B),
    ("llama2_13b", "LlamaForCausalLM", "LlamaConfig", HF_LLAMA2_13B),
    ("mistral_7b", "MistralForCausalLM", "MistralConfig", HF_MISTRAL_7B),
    ("llama3_8b", "LlamaForCausalLM", "LlamaConfig", HF_LLAMA3_8B),
    ("qwen2_0_5b", "Qwen2ForCausalLM", "Qwen2Config", HF_QWEN2_0_5B),
    ("qwen2_7b", "Qwen2ForCausalLM", "Qwen2Config", HF_QWEN2_7B),
    ("gemma_2b", "GemmaForCausalLM", "GemmaConfig", HF_GEMMA_2B),
])
def test_language_tower_matches_hf_exactly(preset, model_cls, config_cls, hf_config):
    _assert_same_as_hf(decoder_params(preset), hf_params(model_cls, config_cls, **hf_config))
