"""A TFDS builder for LLaVA-format data: a LLaVA JSON (or a caption JSONL) plus its image folder.

    builder = prepare("llava", "llava_instruct.json", "images/", data_dir="~/tfds")
    # then train with --config.data.source=tfds --config.data.tfds=lvlm_llava/llava
    #                 --config.data.tfds_dir=~/tfds

Records are checked exactly as `lvlm data convert` checks them (the same code); bad ones are
skipped, logged with their ids, and counted by reason in the dataset's metadata (`skipped`,
`skipped_ids`). Features: `id` (text), `images` (the encoded image files, untouched) and
`conversations` (LLaVA's turns as JSON text; a caption becomes a `<image>` turn and the caption).
Prepared as ArrayRecord, so `tfds.data_source` / `builder.as_data_source()` feed grain directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines import convert
from data_pipelines.arrayrecord_source import deserialize_record
from data_pipelines.templates import IMAGE_MARK

NAME = "lvlm_llava"
FORMATS = ("llava", "captions")  # the builder configs; `convert.FORMATS` names their records
INPUT_SUFFIXES = (".json", ".jsonl")

log = logging.getLogger(__name__)


def _find_input(manual_dir: Path) -> Path:
    files = sorted(p for p in manual_dir.iterdir() if p.suffix in INPUT_SUFFIXES)
    if len(files) != 1:
        raise ValueError(f"the manual dir {str(manual_dir)!r} must hold exactly one "
                         f"{' or '.join(INPUT_SUFFIXES)} file, found {[p.name for p in files]}; "
                         "or pass input_file=")
    return files[0]


def to_example(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    """A checked record of `convert.convert_record` -> this builder's features."""
    if fmt == "captions":
        turns = [{"from": "human", "value": IMAGE_MARK},
                 {"from": "gpt", "value": record["caption"]}]
        images = [record["image"]]
    else:
        turns, images = record["conversations"], record["images"]
    return {"id": record["id"], "images": images,
            "conversations": json.dumps(turns, ensure_ascii=False)}


class LvlmLlava(tfds.core.GeneratorBasedBuilder):
    """LLaVA JSON (config `llava`) or caption JSONL (config `captions`) + images, checked."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="llava", description="LLaVA JSON: {id, image(s), "
                                                          "conversations}"),
        tfds.core.BuilderConfig(name="captions", description="JSONL of {image, caption}"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the one LLaVA JSON (config llava) or caption JSONL (config captions) file in the "
        "manual dir, image paths relative to it; or pass input_file= and images_dir= to the "
        "builder (see data_pipelines.tfds_llava.prepare).")

    def __init__(self, *, input_file: str | os.PathLike | None = None,
                 images_dir: str | os.PathLike | None = None,
                 max_pixels: int = convert.DEFAULT_MAX_PIXELS, **kwargs: Any):
        # Only preparing reads these; a prepared dataset loads without them.
        self._input_file = Path(input_file) if input_file is not None else None
        self._images_dir = Path(images_dir) if images_dir is not None else None
        self._max_pixels = max_pixels
        self.skipped: Counter[str] = Counter()
        self.skipped_ids: dict[str, list[str]] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "images": tfds.features.Sequence(tfds.features.Image()),
                "conversations": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        input_file = self._input_file or _find_input(Path(dl_manager.manual_dir))
        if not input_file.is_file():
            raise FileNotFoundError(f"input file {str(input_file)!r} does not exist")
        images_dir = self._images_dir or input_file.parent
        if not images_dir.is_dir():
            raise FileNotFoundError(f"images directory {str(images_dir)!r} does not exist")
        return {"train": self._generate_examples(input_file, images_dir)}

    def _generate_examples(self, input_file: Path, images_dir: Path
                           ) -> Iterator[tuple[int, dict[str, Any]]]:
        fmt = self.builder_config.name
        items = convert.read_items(input_file)
        kept = 0
        for index, item in enumerate(items):
            try:
                _, data = convert.convert_record(fmt, item, images_dir, self._max_pixels)
            except convert.Skip as e:
                log.warning("skipping record %s: %s: %s", e.id, e.reason, e.detail)
                self.skipped[e.reason] += 1
                self.skipped_ids.setdefault(e.reason, []).append(e.id)
                continue
            kept += 1
            yield index, to_example(fmt, deserialize_record(data))
        # Written into dataset_info.json once the split is done.
        self.info.metadata.update(
            num_input=len(items), num_records=kept,
            skipped=dict(sorted(self.skipped.items())), skipped_ids=self.skipped_ids)


def prepare(fmt: str, input_file: str | os.PathLike, images_dir: str | os.PathLike | None,
            data_dir: str | os.PathLike, max_pixels: int = convert.DEFAULT_MAX_PIXELS
            ) -> LvlmLlava:
    """Builds `lvlm_llava/FMT` from `input_file` into `data_dir` as ArrayRecord; returns the
    builder (`builder.skipped` counts the skipped records by reason)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {list(FORMATS)}")
    builder = LvlmLlava(config=fmt, data_dir=os.fspath(data_dir), input_file=input_file,
                        images_dir=images_dir, max_pixels=max_pixels,
                        file_format="array_record")
    builder.download_and_prepare()
    total = sum(builder.skipped.values())
    log.info("%s: %d records, %d skipped %s", builder.name, builder.info.metadata.get(
        "num_records", 0), total, dict(builder.skipped))
    return builder
