"""TFDS datasets as grain sources: `tfds` ArrayRecord data read by index, adapted to our records.

`TfdsSource("coco_captions", split="train", data_dir=DIR)` opens a dataset prepared in DIR with
`file_format="array_record"` and gives records the loader encodes. Images stay encoded (the
loader decodes them, in its workers). The adapter knows two feature layouts:

- conversation: `conversations` (LLaVA turns as JSON text) and `images` (or `image`), as written
  by our builder (`data_pipelines.tfds_llava`) -> `{id, images, conversations}`; with
  `kind="caption"`, a one-image, one-answer conversation -> `{id, image, caption}`.
- caption: an `image` and `captions` (coco_captions' `[{text, ...}]`, or strings), `caption`,
  `texts` or `text` -> `{id, image, caption}` with the first caption.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import tfds_llava  # noqa: F401  (registers lvlm_llava with tfds)
from data_pipelines.templates import IMAGE_MARK

CAPTION_KEYS = ("captions", "caption", "texts", "text")
ID_KEYS = ("id", "image/id", "image_id")

Record = dict[str, Any]


class _KeepEncoded(tfds.decode.SkipDecoding):
    """SkipDecoding that also skips a sequence of images in numpy (data source) decoding."""

    def decode_batch_example_np(self, serialized_example: Any) -> Any:
        return serialized_example


def _is_image(feature: Any) -> bool:
    return isinstance(feature, tfds.features.Image)


def _is_image_seq(feature: Any) -> bool:
    return isinstance(feature, tfds.features.Sequence) and _is_image(feature.feature)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(value: Any) -> list[str]:
    if isinstance(value, dict):  # a Sequence of dicts decodes to a dict of sequences
        value = value["text"]
    if isinstance(value, str | bytes) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return [_text(value)]
    return [_text(v) for v in value]


def _images(value: Any) -> list[bytes]:
    return [bytes(v) for v in value]


def _record_id(example: Record, index: int, name: str) -> str:
    for key in ID_KEYS:
        if key in example:
            return _text(example[key])
    return f"{name}#{index}"


def make_adapter(features: Any, kind: str | None, name: str = "tfds"
                 ) -> tuple[Callable[[Record, int], Record], str, dict[str, Any]]:
    """(adapter(example, index) -> record, the records' kind, the decoders the adapter needs).

    `kind` None takes the layout's own kind; an impossible kind or an unknown layout raises a
    ValueError naming the features.
    """
    keys = set(features.keys())
    described = ", ".join(f"{k}: {type(features[k]).__name__}" for k in sorted(keys))
    image_key = next((k for k in ("images", "image") if k in keys and (
        _is_image(features[k]) or _is_image_seq(features[k]))), None)
    decoders = {image_key: _KeepEncoded()} if image_key else {}
    if kind not in (None, "caption", "conversation"):
        raise ValueError(f"TFDS dataset {name!r} gives caption or conversation records, not "
                         f"{kind!r} (features: {described})")

    def images_of(example: Record) -> list[bytes]:
        value = example[image_key]
        return _images(value) if _is_image_seq(features[image_key]) else [bytes(value)]

    if "conversations" in keys and image_key is not None:
        if kind == "caption":
            def to_caption(example: Record, index: int) -> Record:
                turns, images = json.loads(_text(example["conversations"])), images_of(example)
                answers = [t["value"] for t in turns if t.get("from") in ("gpt", "assistant")]
                if len(images) != 1 or len(answers) != 1:
                    # encode_example skips it as malformed, counted with its id
                    return {"id": _record_id(example, index, name)}
                return {"id": _record_id(example, index, name), "image": images[0],
                        "caption": answers[0].replace(IMAGE_MARK, "").strip()}
            return to_caption, "caption", decoders

        def to_conversation(example: Record, index: int) -> Record:
            return {"id": _record_id(example, index, name), "images": images_of(example),
                    "conversations": json.loads(_text(example["conversations"]))}
        return to_conversation, "conversation", decoders

    text_key = next((k for k in CAPTION_KEYS if k in keys), None)
    if image_key == "image" and text_key is not None:
        if kind == "conversation":
            raise ValueError(f"TFDS dataset {name!r} holds image captions ({image_key!r} + "
                             f"{text_key!r}): set data.kind=caption")

        def to_caption_record(example: Record, index: int) -> Record:
            captions = _texts(example[text_key])
            record = {"id": _record_id(example, index, name), "image": images_of(example)[0]}
            return {**record, "caption": captions[0]} if captions else record
        return to_caption_record, "caption", decoders

    raise ValueError(
        f"TFDS dataset {name!r} has features {{{described}}}, which no record adapter knows; "
        "known layouts: conversations (JSON text) + images, or image + captions/caption/texts/"
        "text (see data_pipelines/tfds_source.py)")


class TfdsSource:
    """A prepared TFDS dataset's split as a grain random-access source of our records.

    `name` is `NAME[/CONFIG][:VERSION]`; `split` any TFDS split string (`train[:90%]`). Picklable
    (grain workers reopen it by name). `kind` is the records' kind (caption | conversation).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 kind: str | None = None):
        self._args = (name, split, data_dir, kind)
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise FileNotFoundError(f"no TFDS dataset {name!r} (data_dir={data_dir!r}): "
                                    f"{str(e).splitlines()[0]}") from e
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r}; prepare it "
                "with `tfds build NAME --data_dir=DIR --file_format=array_record` (LLaVA JSON: "
                "data_pipelines.tfds_llava.prepare)")
        info = builder.info
        formats = {info.file_format, *getattr(info, "alternative_file_formats", ())}
        if tfds.core.FileFormat.ARRAY_RECORD not in formats:
            raise ValueError(
                f"TFDS dataset {name!r} in {builder.data_dir!r} is stored as "
                f"{info.file_format.value}, which has no random access; prepare it again with "
                "file_format='array_record' (`tfds build ... --file_format=array_record`)")
        available = list(info.splits.keys())
        if split.split("[")[0] not in available:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; "
                             f"its splits: {available}")
        self.name, self.split, self.info = name, split, info
        self._adapt, self.kind, decoders = make_adapter(info.features, kind, name)
        self._source = builder.as_data_source(split, decoders=decoders)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        return self._adapt(self._source[index], index)

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"
