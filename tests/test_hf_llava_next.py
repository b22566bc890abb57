"""LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision against transformers: tiny random models
imported and exported with equal logits, HF processor outputs fed to VLMHandle as they are, and
the processor's placeholder layout equal to ours."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lvlm_jax  # noqa: E402
from data_pipelines.anyres import grid_shape  # noqa: E402
from lvlm_jax.checkpoints.export import export_checkpoint, import_to_params_only  # noqa: E402
from lvlm_jax.checkpoints.hf import export_hf, import_hf  # noqa: E402
from lvlm_jax.models.media_layout import Media, num_media_tokens  # noqa: E402

TOL = 1e-4
IMG, VID = 4, 5
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>", "\n", "What", "is", "this?",
         "a", "cat", "and", "dog", "USER:", "ASSISTANT:"]
PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # wide, tall and square images pick different grids
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
SIGLIP = dict(CLIP, model_type="siglip_vision_model", vision_use_head=False)
LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=32)
QWEN2 = dict(LLAMA, model_type="qwen2")
SIZES = [(10, 30), (30, 10), (20, 20), (12, 12)]  # (h, w): wide, tall, square, square


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>",
                                                 "video_token": "<video>"})
    fast.padding_side = "left"  # as LLaVA-NeXT batches prompts for generation
    return fast


def _next_processor(tokenizer):
    images = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=PINPOINTS)
    return transformers.LlavaNextProcessor(image_processor=images, tokenizer=tokenizer,
                                           patch_size=4, vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1)


BUILDERS = {
    "next": lambda: transformers.LlavaNextForConditionalGeneration(transformers.LlavaNextConfig(
        vision_config=CLIP, text_config=LLAMA, image_token_index=IMG,
        image_grid_pinpoints=PINPOINTS)),
    "next_video": lambda: transformers.LlavaNextVideoForConditionalGeneration(
        transformers.LlavaNextVideoConfig(vision_config=CLIP, text_config=LLAMA,
                                          image_token_index=IMG, video_token_index=VID,
                                          image_grid_pinpoints=PINPOINTS)),
    # anyres_max_2: a square image's 2x2 grid (8x8 features) shrinks, a wide one's does not.
    "onevision": lambda: transformers.LlavaOnevisionForConditionalGeneration(
        transformers.LlavaOnevisionConfig(vision_config=SIGLIP, text_config=QWEN2,
                                          image_token_index=IMG, video_token_index=VID,
                                          image_grid_pinpoints=[[16, 16], *PINPOINTS],
                                          vision_aspect_ratio="anyres_max_2")),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (folder written by save_pretrained, the HF model, our handle)."""
    out = {}
    for i, (name, build) in enumerate(BUILDERS.items()):
        torch.manual_seed(i)
        model = build().eval()
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (path, model, lvlm_jax.from_pretrained(path))
    return out


def _images(rng, sizes=SIZES):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _hf_logits(model, **inputs):
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.numpy()


def _assert_close(ours, ref, mask, what):
    diff = np.abs(ours - ref)[mask.astype(bool)].max()  # padding is garbage on both sides
    assert diff <= TOL, f"{what}: max |logit diff| {diff:.2e}"


@pytest.fixture(scope="module")
def next_batch():
    """HF's processor output: a wide image; a tall and a square image in one prompt; a small
    square image; a text-only row; left-padded."""
    proc = _next_processor(_tokenizer())
    text = ["USER: <image>\nWhat is this? ASSISTANT:", "<image> a cat and <image> a dog",
            "<image>\nWhat is this?", "What is this? a cat"]
    batch = proc(images=_images(np.random.default_rng(0)), text=text, padding=True,
                 return_tensors="np")
    return {k: np.asarray(v) for k, v in batch.items()}


def test_wide_tall_and_square_images_pick_different_grids():
    grids = [grid_shape(s, PINPOINTS, 16) for s in SIZES[:3]]
    assert grids == [(1, 2), (2, 1), (2, 2)]


def test_llava_next_logits_match_transformers_on_processor_outputs(saved, next_batch):
    _, model, vlm = saved["next"]
    b = next_batch
    assert b["pixel_values"].shape == (4, 5, 3, 16, 16)  # padded to the square image's 5 crops
    ref = _hf_logits(model, **b)
    ours = vlm.logits(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"],
                      image_sizes=b["image_sizes"])
    _assert_close(ours, ref, b["attention_mask"], "LLaVA-NeXT")


def test_llava_next_greedy_ids_match_transformers_generate(saved, next_batch):
    _, model, vlm = saved["next"]
    b = next_batch
    with torch.no_grad():
        ref = model.generate(**{k: torch.from_numpy(v) for k, v in b.items()},
                             max_new_tokens=4, do_sample=False).numpy()
    ours = vlm.generate_ids(b["input_ids"], b["pixel_values"], 4,
                            attention_mask=b["attention_mask"], image_sizes=b["image_sizes"])
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["next", "next_video", "onevision"])
def test_export_loads_in_transformers_with_equal_logits(saved, next_batch, tmp_path, name):
    _, model, vlm = saved[name]
    out = export_hf(vlm.config, vlm.params, str(tmp_path / "export"))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["architectures"] == [type(model).__name__]
    loaded = type(model).from_pretrained(out).eval()
    b = _onevision_batch(saved) if name == "onevision" else next_batch
    _assert_close(_hf_logits(loaded, **b), _hf_logits(model, **b), b["attention_mask"],
                  f"{name} export")


def _expand(vlm, texts, media):
    """input_ids of `texts` with each <image>/<video> expanded to its media's token count."""
    tok = _tokenizer()
    rows, it = [], iter(media)
    for text in texts:
        ids = []
        for t in tok(text)["input_ids"]:
            n = num_media_tokens(vlm.config, next(it)) if t in (IMG, VID) else 1
            ids += [t] * n
        rows.append(ids)
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], np.int64)
    return ids, (np.arange(width)[None] >= width - np.array([len(r) for r in rows])[:, None]
                 ).astype(np.int64)


def _video(rng, frames=4):
    return rng.normal(size=(1, frames, 3, 16, 16)).astype(np.float32)


def test_llava_next_video_logits_match_transformers_on_a_4_frame_clip(saved, next_batch):
    _, model, vlm = saved["next_video"]
    clip = _video(np.random.default_rng(1))
    sizes = next_batch["image_sizes"][:1]
    pixels = next_batch["pixel_values"][:1, :3]  # the wide image's 3 crops
    media = [Media(kind="video", frames=4), Media(grid=(1, 2), image_size=tuple(sizes[0]))]
    ids, mask = _expand(vlm, ["USER: <video>\nWhat is this?", "<image> a cat"], media)
    assert (ids == VID).sum() == 4 * 4  # 2x2-pooled frames, no newline
    # One batch row order for HF: videos and images are matched by placeholder order per kind.
    ref = _hf_logits(model, input_ids=ids, attention_mask=mask, pixel_values=pixels,
                     image_sizes=sizes, pixel_values_videos=clip)
    ours = vlm.logits(ids, pixels, attention_mask=mask, image_sizes=sizes,
                      pixel_values_videos=clip)
    _assert_close(ours, ref, mask, "LLaVA-NeXT-Video")


def test_lvlm_import_then_export_keeps_the_video_model_whole(saved, next_batch, tmp_path):
    path, model, vlm = saved["next_video"]
    import_to_params_only(path, str(tmp_path / "ours"))  # `lvlm import`
    again = lvlm_jax.from_pretrained(str(tmp_path / "ours"))
    assert again.config == vlm.config  # pinpoints, newline, video id and pooling included
    b = next_batch
    ids = np.concatenate([b["input_ids"][:1], np.full((1, 16), VID)], axis=1)
    inputs = dict(input_ids=ids, pixel_values=b["pixel_values"][:1, :3],  # the wide image
                  attention_mask=np.concatenate([b["attention_mask"][:1],
                                                 np.ones((1, 16), np.int64)], axis=1),
                  image_sizes=b["image_sizes"][:1],
                  pixel_values_videos=_video(np.random.default_rng(5)))
    ref = _hf_logits(model, **inputs)
    _assert_close(again.logits(**inputs), ref, inputs["attention_mask"], "imported")
    # `lvlm export --format=hf` of that folder: image_newline goes along with the towers
    export_checkpoint(str(tmp_path / "ours"), "hf", str(tmp_path / "hf"))
    loaded = type(model).from_pretrained(str(tmp_path / "hf")).eval()
    _assert_close(_hf_logits(loaded, **inputs), ref, inputs["attention_mask"], "re-exported")


def _onevision_batch(saved):
    vlm = saved["onevision"][2]
    rng = np.random.default_rng(2)
    images = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=[[16, 16], *PINPOINTS])
    wide, square, small, tall = _images(rng, [(10, 30), (30, 30), (12, 12), (30, 10)])
    # The third row has two images: OneVision then keeps each one's global view alone.
    pix = images(images=[[wide], [square], [small, tall]], return_tensors="np")
    sizes = np.asarray(pix["image_sizes"])
    media = [Media(grid=grid_shape(s, vlm.config.image_grid_pinpoints, 16), image_size=tuple(s))
             for s in sizes[:2]] + [Media(), Media()]
    ids, mask = _expand(vlm, ["USER: <image>\nWhat is this?", "<image> a cat",
                              "<image> a cat and <image> a dog"], media)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=np.asarray(pix["pixel_values"]),
                image_sizes=sizes, batch_num_images=np.asarray(pix["batch_num_images"]))


def test_onevision_logits_match_transformers_with_the_anyres_max_shrink_and_a_clip(saved):
    _, model, vlm = saved["onevision"]
    b = _onevision_batch(saved)
    # the 30x30 image: 2x2 grid, 8x8 tile features, over anyres_max_2 -> bilinear to 5x5
    assert num_media_tokens(vlm.config, Media(grid=(2, 2), image_size=(30, 30))) == 16 + 5 * 6
    ref = _hf_logits(model, **b)
    ours = vlm.logits(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"],
                      image_sizes=b["image_sizes"], batch_num_images=b["batch_num_images"])
    _assert_close(ours, ref, b["attention_mask"], "OneVision images")
    clip = _video(np.random.default_rng(3), frames=3)
    ids, mask = _expand(vlm, ["<video> What is this?"], [Media(kind="video", frames=3)])
    assert (ids == VID).sum() == 3 * 2 * 2 + 1  # bilinear 4x4 -> 2x2 per frame, one newline
    ref = _hf_logits(model, input_ids=ids, attention_mask=mask, pixel_values_videos=clip)
    _assert_close(vlm.logits(ids, attention_mask=mask, pixel_values_videos=clip), ref, mask,
                  "OneVision clip")


def test_placeholder_layout_equals_the_hf_processor_for_30_image_sizes(saved):
    vlm = saved["next"][2]
    proc = _next_processor(_tokenizer())
    rng = np.random.default_rng(4)
    sizes = [(int(h), int(w)) for h, w in rng.integers(4, 64, (30, 2))]
    sizes[:3] = [(8, 60), (60, 8), (33, 33)]
    text = "<image>\nWhat is this?"
    for size, image in zip(sizes, _images(rng, sizes), strict=True):
        theirs = proc(images=[image], text=[text], return_tensors="np")["input_ids"][0]
        n = num_media_tokens(vlm.config, Media(grid=grid_shape(size, PINPOINTS, 16),
                                               image_size=size))
        ours = [IMG] * n + _tokenizer()("\nWhat is this?")["input_ids"]
        assert theirs.tolist() == ours, size


def test_unsupported_video_pooling_is_refused_in_one_line(saved, tmp_path):
    src = saved["next_video"][0]
    dst = tmp_path / "conv"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["spatial_pool_mode"] = "conv"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="spatial_pool_mode 'conv' is not supported; supported: "
                                         "'average'"):
        import_hf(str(dst))


def test_crop_count_disagreeing_with_image_sizes_is_refused(saved, next_batch):
    vlm = saved["next"][2]
    b = next_batch
    with pytest.raises(ValueError, match=r"tiles into 1 \+ 2x2 = 5 crops, but pixel_values "
                                         "holds 3 per image"):
        vlm.logits(b["input_ids"], b["pixel_values"][:, :3], image_sizes=b["image_sizes"])
    with pytest.raises(ValueError, match="image_sizes has 3 entries for 4 images"):
        vlm.logits(b["input_ids"], b["pixel_values"], image_sizes=b["image_sizes"][:3])
    swapped = b["image_sizes"][[1, 0, 2, 3]]  # 3 crops each way, but other token counts
    with pytest.raises(ValueError, match="row 0: image 0 takes 40 placeholder tokens"):
        vlm.logits(b["input_ids"], b["pixel_values"], image_sizes=swapped)
