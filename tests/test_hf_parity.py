"""Parity with HF transformers: tiny random LLaVA / PaliGemma / DeepSeek-VL (and single towers)
built offline, saved with save_pretrained, imported, and compared on logits and greedy tokens;
export back to transformers; clear errors on bad checkpoints."""

import copy
import filecmp
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from xla_env import cpu_env  # noqa: E402

import lvlm_jax  # noqa: E402
from lvlm_jax.checkpoints.hf import config_from_hf, export_hf, import_hf  # noqa: E402
from lvlm_jax.models.language import Decoder, language_config  # noqa: E402
from lvlm_jax.models.vision import VisionEncoder, vision_config  # noqa: E402

TOL = 1e-4
IMG = 3  # the image placeholder id of every tiny model here
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)
TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2  # 16 tokens per image


def _llava(vision_type, text_type, **kw):
    cfg = transformers.LlavaConfig(vision_config=dict(model_type=vision_type, **VISION),
                                   text_config=dict(model_type=text_type, **TEXT),
                                   image_token_index=IMG, **kw)
    return transformers.LlavaForConditionalGeneration(cfg)


def _paligemma():
    text = dict(TEXT, model_type="gemma", num_key_value_heads=1, head_dim=16)
    cfg = transformers.PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model",
                                                          **VISION),
                                       text_config=text, image_token_index=IMG,
                                       projection_dim=TEXT["hidden_size"])
    return transformers.PaliGemmaForConditionalGeneration(cfg)


def _deepseek_vl():
    vision = dict(VISION, model_type="siglip_vision_model", vision_use_head=False)
    cfg = transformers.DeepseekVLConfig(vision_config=vision,
                                        text_config=dict(model_type="llama", **TEXT),
                                        image_token_id=IMG, tie_word_embeddings=False)
    return transformers.DeepseekVLForConditionalGeneration(cfg)


BUILDERS = {
    # feature layer -2 and the "default" strategy (CLS dropped) are LLaVA's defaults.
    "llava_clip_llama": lambda: _llava("clip_vision_model", "llama"),
    "llava_siglip_qwen2": lambda: _llava("siglip_vision_model", "qwen2", vision_feature_layer=-1,
                                         vision_feature_select_strategy="full"),
    "paligemma": _paligemma,
    # SigLIP's final (post-layernormed) output through a 2-layer MLP: the demo's model.
    "deepseek_vl_siglip_llama": _deepseek_vl,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder written by save_pretrained, the HF model in eval mode)."""
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        model = build().eval()
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def handles(saved):
    return {name: lvlm_jax.from_pretrained(path) for name, (path, _) in saved.items()}


def _text(rng, n):
    return list(rng.integers(4, TEXT["vocab_size"], n))  # ids 0-3 are pad/bos/eos/image


def _llava_inputs(seed=0):
    """Two rows: two images in the first, one in the second (left-padded by 4)."""
    rng = np.random.default_rng(seed)
    rows = [_text(rng, 3) + [IMG] * TOKENS + _text(rng, 2) + [IMG] * TOKENS + _text(rng, 4),
            [0] * 4 + _text(rng, 3) + [IMG] * TOKENS + _text(rng, 18)]
    ids = np.array(rows, np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    return ids, pixels, mask


def _hf_logits(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


@pytest.mark.parametrize("name", ["llava_clip_llama", "llava_siglip_qwen2",
                                  "deepseek_vl_siglip_llama"])
def test_llava_logits_match_transformers(saved, handles, name):
    ids, pixels, mask = _llava_inputs()
    ref = _hf_logits(saved[name][1], input_ids=ids, pixel_values=pixels, attention_mask=mask)
    ours = handles[name].logits(ids, pixels, attention_mask=mask)
    real = mask.astype(bool)  # padded positions are garbage on both sides
    diff = np.abs(ours - ref)[real].max()
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("with_token_types", [True, False])
def test_paligemma_logits_match_transformers(saved, handles, with_token_types):
    rng = np.random.default_rng(1)
    ids = np.array([[IMG] * TOKENS + [2] + _text(rng, 7) + _text(rng, 5) for _ in range(2)])
    token_types = np.zeros_like(ids)
    token_types[:, -5:] = 1  # the suffix: causal; the image + prompt prefix: bidirectional
    pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    extra = {"token_type_ids": token_types} if with_token_types else {}
    ref = _hf_logits(saved["paligemma"][1], input_ids=ids, pixel_values=pixels, **extra)
    ours = handles["paligemma"].logits(ids, pixels, **extra)
    assert np.abs(ours - ref).max() <= TOL


def test_llava_greedy_generation_matches_transformers(saved, handles):
    ids, pixels, mask = _llava_inputs(seed=2)
    model = saved["llava_clip_llama"][1]
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             pixel_values=torch.from_numpy(pixels), max_new_tokens=20,
                             do_sample=False).numpy()
    ours = handles["llava_clip_llama"].generate_ids(ids, pixels, 20, attention_mask=mask)
    assert ref.shape == (2, ids.shape[1] + 20)
    np.testing.assert_array_equal(ours, ref)


def _rename_keys(src, dst, rename):
    shutil.copytree(src, dst)
    tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
    renamed = {rename(k): v for k, v in tensors.items()}
    safetensors_torch.save_file(renamed, os.path.join(dst, "model.safetensors"),
                                metadata={"format": "pt"})


LAYOUTS = {
    # The hub's LLaVA files: the tower wrapped as CLIPVisionModel.
    "hub": lambda k: k.replace("vision_tower.", "vision_tower.vision_model."),
    # transformers 4.52-4.57 module names.
    "model_prefixed": lambda k: ("lm_head." + k[len("language_model.lm_head."):]
                                 if k.startswith("language_model.lm_head.")
                                 else "model." + k.replace("language_model.model.",
                                                           "language_model.")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_other_key_layouts_import_identically(saved, handles, tmp_path, layout):
    src, model = saved["llava_clip_llama"]
    dst = str(tmp_path / layout)
    _rename_keys(src, dst, LAYOUTS[layout])
    ids, pixels, mask = _llava_inputs()
    ours = lvlm_jax.from_pretrained(dst).logits(ids, pixels, attention_mask=mask)
    ref = _hf_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= TOL
    _, params = import_hf(dst)
    jax.tree.map(np.testing.assert_array_equal, params, handles["llava_clip_llama"].params)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_export_loads_in_transformers_with_the_same_weights(saved, tmp_path, name):
    src, model = saved[name]
    cfg, params = import_hf(src)
    out = export_hf(cfg, params, str(tmp_path / "export"))
    loaded, info = type(model).from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    before, after = model.state_dict(), loaded.eval().state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    ids, pixels, mask = _llava_inputs()
    if name == "paligemma":
        ids, pixels, mask = ids[:1, :TOKENS * 2 + 5], pixels[:2], mask[:1, :TOKENS * 2 + 5]
    np.testing.assert_array_equal(
        _hf_logits(loaded, input_ids=ids, pixel_values=pixels, attention_mask=mask),
        _hf_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask))


def test_export_import_export_is_byte_identical(saved, tmp_path):
    cfg, params = import_hf(saved["paligemma"][0], scan_layers=False)
    first = export_hf(cfg, params, str(tmp_path / "first"))
    cfg2, params2 = import_hf(first)  # scanned this time: the layout must not matter
    second = export_hf(cfg2, params2, str(tmp_path / "second"))
    for f in ("model.safetensors", "config.json"):
        assert filecmp.cmp(os.path.join(first, f), os.path.join(second, f), shallow=False), f


def test_bfloat16_checkpoints_import_and_export_exactly(saved, tmp_path):
    bf16 = copy.deepcopy(saved["llava_clip_llama"][1]).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    cfg, params = import_hf(str(tmp_path / "bf16"), param_dtype="bfloat16")
    assert params["decoder"]["embed_tokens"]["embedding"].dtype == "bfloat16"
    loaded = type(bf16).from_pretrained(export_hf(cfg, params, str(tmp_path / "out")))
    assert loaded.dtype == torch.bfloat16
    for key, value in bf16.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def _digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder))}


def test_export_never_overwrites(saved, tmp_path):
    cfg, params = import_hf(saved["llava_clip_llama"][0])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_hf(cfg, params, str(out))
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # no temporary left behind


def _corrupt_truncated(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _corrupt_header(path):
    data = bytearray(open(path, "rb").read())
    data[8:40] = b"\x00garbage, not a JSON header...\x00"
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("case", ["not_a_checkpoint", "no_weights", "unsupported",
                                  "truncated", "bad_header"])
def test_bad_checkpoints_fail_clearly_and_touch_nothing(saved, tmp_path, case):
    folder = tmp_path / case
    if case == "not_a_checkpoint":
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        error, match = FileNotFoundError, "not a Hugging Face checkpoint"
    else:
        shutil.copytree(saved["llava_clip_llama"][0], folder)
        weights = str(folder / "model.safetensors")
        if case == "no_weights":
            os.remove(weights)
            error, match = FileNotFoundError, "no \\*.safetensors"
        elif case == "unsupported":
            (folder / "config.json").write_text(json.dumps(
                {"architectures": ["BertModel"], "model_type": "bert"}))
            error, match = ValueError, "BertModel.*supported: LlavaForConditionalGeneration"
        elif case == "truncated":
            _corrupt_truncated(weights)
            error, match = ValueError, "model.safetensors is not a valid safetensors file"
        else:
            _corrupt_header(weights)
            error, match = ValueError, "model.safetensors is not a valid safetensors file"
    before = _digest(folder)
    with pytest.raises(error, match=match):
        lvlm_jax.from_pretrained(str(folder))
    with pytest.raises(error, match=match):
        import_hf(str(folder))
    assert _digest(folder) == before


@pytest.mark.parametrize("change, match", [
    ({"vision_feature_select_strategy": "default",
      "vision_config": dict(VISION, model_type="siglip_vision_model")}, "SigLIP"),
    ({"vision_feature_layer": [-2, -5]}, "single int layer"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ({"text_config": dict(TEXT, model_type="llama",
                          rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})},
     "rope_type 'llama3'"),
    ({"text_config": dict(TEXT, model_type="phi3")}, "text model_type 'phi3'"),
])
def test_unsupported_config_values_are_named(saved, change, match):
    with open(os.path.join(saved["llava_clip_llama"][0], "config.json")) as f:
        hf = json.load(f)
    with pytest.raises(ValueError, match=match):
        config_from_hf({**hf, **change})


TOWERS = {
    "CLIPVisionModel": lambda: transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(**VISION)),
    "SiglipVisionModel": lambda: transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**VISION)),
    "CLIPModel": lambda: transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4))),
    "MistralForCausalLM": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(**TEXT)),
    "Qwen2ForCausalLM": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TEXT)),
    "GemmaForCausalLM": lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**dict(TEXT, head_dim=16))),
}


@pytest.mark.parametrize("arch", list(TOWERS))
def test_single_towers_import_and_match(tmp_path, arch):
    torch.manual_seed(0)
    model = TOWERS[arch]().eval()
    model.save_pretrained(str(tmp_path))
    cfg, params = import_hf(str(tmp_path))
    rng = np.random.default_rng(0)
    if "vision" in cfg:
        assert list(params) == ["vision"]
        pixels = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            out = (model.vision_model if arch == "CLIPModel" else model)(
                torch.from_numpy(pixels), output_hidden_states=True)
        # CLIP: LLaVA's hidden state -2 with CLS; SigLIP: the post-normed output + MAP head.
        clip = arch != "SiglipVisionModel"
        v = vision_config(**cfg["vision"], **(dict(feature_layer=-2, drop_cls=False) if clip
                                                else {}))
        got = VisionEncoder(v).apply({"params": params["vision"]}, pixels.transpose(0, 2, 3, 1))
        want = [out.hidden_states[-2]] if clip else [out.last_hidden_state, out.pooler_output]
    else:
        assert list(params) == ["decoder"]
        ids = rng.integers(0, TEXT["vocab_size"], (2, 12))
        with torch.no_grad():
            want = [model(torch.from_numpy(ids)).logits]
        pos = np.broadcast_to(np.arange(12), ids.shape)
        got = Decoder(language_config(**cfg["language"])).apply(
            {"params": params["decoder"]}, ids,
            method=lambda m, i: m(m.embed(i), pos, np.ones_like(i))[0])
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(g) - w.numpy()).max() <= TOL


def test_lvlm_import_cli_writes_a_checkpoint_with_the_same_logits(saved, handles, tmp_path):
    import subprocess
    import sys

    path, model = saved["llava_clip_llama"]
    out = tmp_path / "imported"
    env = cpu_env()
    run = subprocess.run([sys.executable, "-m", "lvlm_jax", "import", f"--hf={path}",
                          f"--out={out}"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "imported" in run.stdout
    ids, pixels, mask = _llava_inputs()
    ours = lvlm_jax.from_pretrained(str(out)).logits(ids, pixels, attention_mask=mask)
    ref = _hf_logits(model, input_ids=ids, pixel_values=pixels, attention_mask=mask)
    m = mask.astype(bool)
    assert np.max(np.abs(ours[m] - ref[m])) <= TOL
    again = subprocess.run([sys.executable, "-m", "lvlm_jax", "import", f"--hf={path}",
                            f"--out={out}"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr
