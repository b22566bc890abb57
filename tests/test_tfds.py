"""TFDS sources: our LLaVA builder prepares checked ArrayRecord data that trains through
`data.source=tfds` batch for batch as its records encode, and a coco_captions-like layout reads
through the same record adapter."""

import io
import json

import numpy as np
import pytest
from training_utils import tiny_config

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("tensorflow")  # preparing image features needs it

from PIL import Image  # noqa: E402

from data_pipelines import tfds_llava  # noqa: E402
from data_pipelines.images import prepare_image  # noqa: E402
from data_pipelines.loader import demo_tokenizer, encode_example, make_dataset  # noqa: E402
from data_pipelines.tfds_source import TfdsSource, make_adapter  # noqa: E402

N_GOOD = 16
SEQ, SIZE, BATCH = 64, 16, 8


def _encoded(fmt: str, seed: int, size=(20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    colors = ["red", "green", "blue", "yellow"]
    records = []
    for i in range(N_GOOD):
        name = f"{i}.png" if i % 2 else f"{i}.jpg"
        (root / "images" / name).write_bytes(_encoded("PNG" if i % 2 else "JPEG", i))
        records.append({"id": f"rec{i}", "image": name, "conversations": _turns(
            "<image>\nwhat color is the circle?", f"the circle is {colors[i % 4]}.")})
    records.append({"id": "missing", "image": "nope.png",
                    "conversations": _turns("<image>\ndescribe.", "a circle.")})
    records.append({"id": "mismatch", "image": "0.jpg",
                    "conversations": _turns("describe.", "a circle.")})
    (root / "llava.json").write_text(json.dumps(records))
    data_dir = root / "tfds"
    builder = tfds_llava.prepare("llava", root / "llava.json", root / "images", data_dir)
    return root, data_dir, builder, {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    demo_tokenizer(path)
    return path


def _tfds_config(data_dir, name="lvlm_llava/llava", **kw):
    cfg = tiny_config(batch=BATCH, seq=SEQ, steps=2, **kw)
    cfg.model.language.vocab_size = 512  # the demo tokenizer's pieces
    cfg.model.image_token_id = -1
    cfg.data.source, cfg.data.tfds, cfg.data.tfds_dir = "tfds", name, str(data_dir)
    cfg.data.shuffle = False
    return cfg


def test_builder_skips_and_counts_bad_records_like_convert(llava):
    _, data_dir, builder, _ = llava
    assert builder.info.splits["train"].num_examples == N_GOOD
    assert dict(builder.skipped) == {"image_count_mismatch": 1, "missing_image": 1}
    # The counts are kept in the prepared dataset's metadata.
    reread = tfds.builder("lvlm_llava/llava", data_dir=str(data_dir))
    assert reread.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    meta = reread.info.metadata
    assert (meta["num_input"], meta["num_records"]) == (N_GOOD + 2, N_GOOD)
    assert meta["skipped_ids"] == {"image_count_mismatch": ["mismatch"],
                                   "missing_image": ["missing"]}


def test_records_keep_ids_turns_and_the_original_image_bytes(llava):
    root, data_dir, _, by_id = llava
    source = TfdsSource("lvlm_llava/llava:1.0.0", "train", str(data_dir))
    assert source.kind == "conversation" and len(source) == N_GOOD
    ids = [source[i]["id"] for i in range(N_GOOD)]
    assert sorted(ids) == sorted(f"rec{i}" for i in range(N_GOOD))
    for i in range(N_GOOD):
        record = source[i]
        original = by_id[record["id"]]
        assert record["conversations"] == original["conversations"]
        assert record["images"] == [(root / "images" / original["image"]).read_bytes()]


def test_training_on_tfds_batches_equals_the_records_encoded_directly(llava, tok_cache,
                                                                    tmp_path, monkeypatch):
    root, data_dir, _, by_id = llava
    monkeypatch.setenv("LVLM_CACHE", str(tok_cache))
    from lvlm_jax.train import input_pipeline, loop

    cfg = _tfds_config(data_dir)
    batches, model_cfg, size = input_pipeline.make_input(cfg)
    assert size == N_GOOD
    first = next(batches)
    order = [TfdsSource("lvlm_llava/llava", "train", str(data_dir))[i]["id"]
             for i in range(BATCH)]
    tokenizer = demo_tokenizer(tok_cache)
    for row, record_id in enumerate(order):
        original = by_id[record_id]
        image = (root / "images" / original["image"]).read_bytes()
        want = encode_example(
            {"images": [image], "conversations": original["conversations"]},
            kind="conversation", tokenizer=tokenizer, template=cfg.data.template, seq_len=SEQ,
            image_size=SIZE, image_tokens=model_cfg.image_tokens)
        for name, value in want.items():
            np.testing.assert_array_equal(first[name][row], value, err_msg=f"{record_id} {name}")
        np.testing.assert_array_equal(first["pixel_values"][row, 0], prepare_image(image, SIZE))

    _, history = loop.train(cfg, str(tmp_path / "run"))
    losses = [h["loss"] for h in history]
    assert len(losses) == 2 and np.all(np.isfinite(losses))


class CocoLike(tfds.core.GeneratorBasedBuilder):
    """coco_captions' layout in miniature: an image, its id and several captions."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs looks for files of a package.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"id": np.int64, "text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 8), "val": self._generate_examples(8, 10)}

    def _generate_examples(self, start, stop):
        for i in range(start, stop):
            yield i, {"image": _encoded("JPEG", 100 + i), "image/id": 1000 + i,
                      "captions": [{"id": 10 * i + j, "text": f"caption {j} of image {i}."}
                                   for j in range(3)]}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("coco")
    CocoLike(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_catalogue_caption_layout_gives_caption_records(coco_dir, tok_cache):
    source = TfdsSource("coco_like", "train", str(coco_dir), kind="caption")
    assert source.kind == "caption" and len(source) == 8
    records = sorted((source[i] for i in range(8)), key=lambda r: int(r["id"]))
    for i, record in enumerate(records):
        assert record["id"] == str(1000 + i)
        assert record["caption"] == f"caption 0 of image {i}."
        assert record["image"] == _encoded("JPEG", 100 + i)
    assert len(TfdsSource("coco_like", "val", str(coco_dir))) == 2
    ds = make_dataset(source, kind="caption", tokenizer=demo_tokenizer(tok_cache),
                      template="plain", seq_len=32, image_size=SIZE, image_tokens=4,
                      batch_size=4, seed=0)
    batch = next(iter(ds))
    assert batch["pixel_values"].shape == (4, 1, SIZE, SIZE, 3) and batch["loss_mask"].sum() > 0


def test_bad_names_kinds_and_layouts_fail_naming_the_problem(coco_dir, llava):
    from lvlm_jax.train.input_pipeline import make_source

    _, data_dir, _, _ = llava
    with pytest.raises(ValueError, match="set data.kind=caption"):
        TfdsSource("coco_like", "train", str(coco_dir), kind="conversation")
    with pytest.raises(ValueError, match="no split 'test'.*'train', 'val'|no split 'test'"):
        TfdsSource("coco_like", "test", str(coco_dir))
    with pytest.raises(FileNotFoundError, match="not prepared"):
        TfdsSource("lvlm_llava/captions", "train", str(data_dir))
    with pytest.raises(FileNotFoundError, match="no TFDS dataset 'no_such_set'"):
        TfdsSource("no_such_set", "train", str(data_dir))
    features = tfds.features.FeaturesDict({"pixels": tfds.features.Tensor(shape=(4,),
                                                                           dtype=np.uint8),
                                           "label": tfds.features.ClassLabel(num_classes=3)})
    with pytest.raises(ValueError, match=r"features \{label: ClassLabel, pixels: Tensor\}"):
        make_adapter(features, None, "mnist_like")
    with pytest.raises(ValueError, match="needs data.tfds=NAME"):
        make_source(_tfds_config(data_dir, name=""), None)
