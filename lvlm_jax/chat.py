"""Answers prompts about images with a trained run: `lvlm generate` and its `--chat` session.

    bot = chat.load("/tmp/demo/sft")                     # a training workdir (latest checkpoint)
    print(chat.answer(bot, ["cat.png"], "What colour is the shape?"))

The prompt is rendered with the run's chat template and tokenizer, and images are prepared as the
training input pipeline prepares them: any-res models get tiles, and video clips (`video_paths`)
sampled frames, as flattened media (lvlm_jax/chat_media.py). Input a user can fix (a missing or
unreadable image or clip, an empty prompt, a prompt longer than the model's context) raises
`BadInput` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import jax
import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.templates import IMAGE_MARK, end_of_turn_ids, get_template, render
from data_pipelines.tokenizer_base import VIDEO_MARK
from lvlm_jax import chat_media
from lvlm_jax.chat_media import BadInput as BadInput  # raised here; the CLI catches chat.BadInput
from lvlm_jax.chat_media import PromptMedia
from lvlm_jax.generate import generate_tokens, left_pad, params_platform
from lvlm_jax.models.vlm import normalize_pixels

# Prompts are left-padded to a multiple of this, so that a chat's growing history (or a batch of
# one-off prompts of similar length) reuses one compiled decode instead of compiling per length.
LENGTH_BUCKET = 64
QUIT = "/quit"


@dataclasses.dataclass
class Chatbot:
    """A loaded run: the model and params, and the tokenizer, template and image settings it was
    trained with."""

    model: Any
    params: Any
    tokenizer: Any
    template: str
    image_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    image_mode: str = "pad"
    num_frames: int = chat_media.DEFAULT_NUM_FRAMES  # frames sampled from a clip

    @property
    def max_length(self) -> int:
        return self.model.cfg.language.max_length

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys([*end_of_turn_ids(self.template, self.tokenizer),
                                    self.tokenizer.eos_id]))


def _run_config(checkpoint: str) -> dict[str, Any]:
    """The experiment config the run was trained with: `config.json` in the checkpoint folder
    (a workdir) or beside it (a params-only export inside or next to the workdir)."""
    for directory in (checkpoint, os.path.dirname(os.path.abspath(checkpoint))):
        path = os.path.join(directory, "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            if isinstance(cfg, dict) and "data" in cfg:
                return cfg
    raise BadInput(f"no training config.json in or beside {checkpoint!r}: it names the "
                   "tokenizer and chat template the model was trained with")


def load(checkpoint: str, unscan_decoder: bool | None = None) -> Chatbot:
    """A training workdir (its latest checkpoint) or a params-only checkpoint with the run's
    config.json beside it -> a Chatbot.

    `unscan_decoder`: decode with the decoder's layers unrolled, ~1.5x faster on CPU, where a
    scanned decoder slices each layer's weights and cache every step; None: True where the
    params live on CPU devices."""
    from ml_collections import ConfigDict

    from lvlm_jax.api import from_pretrained, with_unscanned_decoder
    from lvlm_jax.checkpoints.export import MODEL_CONFIG
    from lvlm_jax.train.input_pipeline import load_tokenizer

    if not os.path.isdir(checkpoint):
        raise BadInput(f"checkpoint {checkpoint!r} does not exist or is not a folder")
    if not os.path.isfile(os.path.join(checkpoint, MODEL_CONFIG)):
        raise BadInput(f"{checkpoint!r} is not a training workdir or params-only checkpoint "
                       f"(no {MODEL_CONFIG})")
    data = ConfigDict(_run_config(checkpoint)["data"])
    get_template(data.template)  # an unknown template fails here, naming the valid ones
    vlm = from_pretrained(checkpoint)
    if unscan_decoder is None:
        unscan_decoder = params_platform(vlm.params) == "cpu"
    if unscan_decoder:
        vlm = with_unscanned_decoder(vlm)
    tokenizer = load_tokenizer(data, checkpoint)  # the one the run saved, if it did
    if tokenizer.vocab_size > vlm.config.language.vocab_size:
        raise BadInput(f"the run's tokenizer has {tokenizer.vocab_size} pieces but the model's "
                       f"vocabulary is {vlm.config.language.vocab_size}")
    return Chatbot(model=vlm.model, params=vlm.params, tokenizer=tokenizer,
                   template=data.template,
                   image_size=int(data.get("image_size") or vlm.config.vision.image_size),
                   image_mean=tuple(data.image_mean), image_std=tuple(data.image_std),
                   image_mode=data.get("image_mode", "pad"),
                   num_frames=int(data.get("num_frames") or chat_media.DEFAULT_NUM_FRAMES))


def _check_image_path(path: str) -> None:
    if os.path.isdir(path):
        raise BadInput(f"image {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise BadInput(f"image {path!r} does not exist")


def check_image_files(paths: Sequence[str]) -> None:
    """Fails on a path that is not a readable image file, before anything slow is loaded."""
    from PIL import Image

    for path in paths:
        _check_image_path(path)
        try:
            with Image.open(path) as img:
                img.verify()
        except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise BadInput(f"image {path!r} is not a readable image ({type(e).__name__})") from e


def check_request(image_paths: Sequence[str], prompt: str, video_paths: Sequence[str] = (),
                  num_frames: int | None = None, **sampling: Any) -> str:
    """Validates a one-off request without loading anything; returns the prompt with its
    `<image>` / `<video>` marks."""
    if not prompt.strip():
        raise BadInput("the prompt is empty")
    text = chat_media.with_media_marks(prompt, len(image_paths), len(video_paths))
    check_sampling(**sampling)
    check_image_files(image_paths)
    chat_media.check_videos(video_paths, num_frames)
    return text


def read_inputs(bot: Chatbot, image_paths: Sequence[str], video_paths: Sequence[str] = (),
                num_frames: int | None = None) -> np.ndarray | PromptMedia | None:
    """The media of a request as the model takes them: flattened (PromptMedia: any-res tiles,
    clips' frames) where the model or a clip needs it, else `read_images`' pixels."""
    if not chat_media.uses_layout(bot.model.cfg, len(video_paths)):
        return read_images(bot, image_paths)
    for path in image_paths:
        _check_image_path(path)
    try:
        return chat_media.read_media(bot.model.cfg, image_paths, video_paths,
                                     crop_size=bot.image_size, image_mode=bot.image_mode,
                                     num_frames=num_frames or bot.num_frames)
    except (OSError, SyntaxError) as e:  # an image PIL cannot read
        raise BadInput(f"an image is not readable ({type(e).__name__}: {e})") from e


def read_images(bot: Chatbot, paths: Sequence[str]) -> np.ndarray | None:
    """Image files -> normalised pixels [1, images, H, W, 3] (None without images), prepared as
    the training pipeline prepares them."""
    if not paths:
        return None
    prepared = []
    for path in paths:
        _check_image_path(path)
        try:
            prepared.append(prepare_image(path, bot.image_size, bot.image_mode))
        except (OSError, ValueError, TypeError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise BadInput(f"image {path!r} is not a readable image ({type(e).__name__})") from e
    pixels = normalize_pixels(np.stack(prepared)[None], bot.image_mean, bot.image_std)
    return np.asarray(pixels)


def with_image_marks(prompt: str, n_images: int) -> str:
    """The prompt with one `<image>` per image prepended, unless it places them itself."""
    return chat_media.with_media_marks(prompt, n_images)


def prompt_ids(bot: Chatbot, conversation: Sequence[dict[str, str]]) -> np.ndarray:
    """The conversation rendered by the run's template, ending with the assistant prefix."""
    ids, _ = render(bot.template, conversation, bot.tokenizer, max(bot.model.cfg.image_tokens, 1),
                    add_generation_prompt=True)
    _check_length(bot, ids)
    return ids


def media_prompt_ids(bot: Chatbot, conversation: Sequence[dict[str, str]],
                     media: PromptMedia) -> tuple[np.ndarray, Callable[[int], Any]]:
    """`prompt_ids` with each `<image>` / `<video>` expanded to its image's or clip's
    placeholder run (as HF's processors expand them), and a function from the left padding
    the row gets to its MediaLayout."""
    cfg = bot.model.cfg
    kinds = chat_media.mark_kinds(conversation)
    ids, _ = render(bot.template, chat_media.one_placeholder_each(conversation), bot.tokenizer,
                    1, add_generation_prompt=True)
    ids, placeholders, order = chat_media.expand_placeholders(
        cfg, ids, bot.tokenizer.image_id, kinds, media)
    _check_length(bot, ids, int(placeholders.sum()))

    def layout(pad: int):
        mask = np.concatenate([np.zeros(pad, bool), placeholders])[None]
        return chat_media.media_layout(cfg, mask, order, media, kinds, bot.image_mean,
                                       bot.image_std)

    return ids, layout


def _check_length(bot: Chatbot, ids: np.ndarray, images: int | None = None) -> None:
    if len(ids) >= bot.max_length:
        if images is None:
            images = int(np.sum(ids == bot.tokenizer.image_id))
        raise BadInput(f"the prompt is too long: {len(ids)} tokens ({images} of them image "
                       f"tokens), and the model's context (language.max_length) is "
                       f"{bot.max_length} tokens")


def reply(bot: Chatbot, conversation: Sequence[dict[str, str]],
          pixels: np.ndarray | PromptMedia | None, *, max_new_tokens: int = 64,
          temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """The model's next assistant turn after `conversation` (LLaVA format: {from, value}).
    `pixels`: read_images' array, or read_inputs' PromptMedia (any-res images, clips)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    layout = None
    if isinstance(pixels, PromptMedia):
        ids, layout = media_prompt_ids(bot, conversation, pixels)
    else:
        ids = prompt_ids(bot, conversation)
    n = len(ids)
    new = min(max_new_tokens, bot.max_length - n)  # the cache never outgrows the context
    bucket = min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, bot.max_length - new)
    ids, seg = left_pad([ids.tolist()], pad_id=bot.tokenizer.pad_id, length=bucket)
    if layout is not None:
        has_media = pixels.images or pixels.videos
        pixels = layout(bucket - n) if has_media else None
    out = generate_tokens(bot.model, bot.params, ids, seg, pixels, jax.random.PRNGKey(seed),
                          max_new_tokens=new, temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), stop_ids=bot.stop_ids, pad_id=bot.tokenizer.pad_id,
                          prefix_lm=bot.model.cfg.prefix_lm)
    tokens = np.asarray(out["tokens"])[0, :int(out["lengths"][0])]
    # An image placeholder is no text, and a reply may not hold one when it goes back in a chat.
    drop = {*bot.stop_ids, bot.tokenizer.image_id, bot.model.cfg.image_token_id,
            bot.model.cfg.video_token_id}
    kept = [int(t) for t in tokens if int(t) not in drop]
    return bot.tokenizer.decode(kept).strip()


def check_sampling(max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                   top_p: float = 1.0, seed: int = 0) -> None:
    del seed  # any int
    if max_new_tokens < 1:
        raise BadInput(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise BadInput(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise BadInput(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise BadInput(f"top_p must be in (0, 1], got {top_p}")


def answer(bot: Chatbot | str, image_paths: Sequence[str], prompt: str,
           video_paths: Sequence[str] = (), num_frames: int | None = None,
           **sampling: Any) -> str:
    """One prompt about the images and clips (one `<image>` / `<video>` each, prepended unless
    the prompt has them) -> the answer. `bot` may be a checkpoint path; `num_frames` per clip
    defaults to the run's data.num_frames (else 8). `sampling`: max_new_tokens, temperature,
    top_k, top_p, seed (greedy by default)."""
    text = check_request(image_paths, prompt, video_paths, num_frames, **sampling)
    bot = load(bot) if isinstance(bot, str) else bot
    pixels = read_inputs(bot, image_paths, video_paths, num_frames)
    return reply(bot, [{"from": "human", "value": text}], pixels, **sampling)


def chat(bot: Chatbot, image_paths: Sequence[str], lines: Iterable[str], out: TextIO,
         err: TextIO, *, interactive: bool = False, video_paths: Sequence[str] = (),
         num_frames: int | None = None, **sampling: Any) -> list[dict[str, str]]:
    """A multi-turn session: each line of `lines` is a user turn, each reply a line on `out`.

    The images and clips go with the first turn. `/quit` or the end of `lines` ends the session;
    a turn the model cannot take (too long, new `<image>` marks) is reported on `err` and
    dropped, and the session goes on. Returns the conversation.
    """
    # Bad images and clips fail before the first turn.
    pixels = read_inputs(bot, image_paths, video_paths, num_frames)
    conversation: list[dict[str, str]] = []
    if interactive:
        clips = f" and {len(video_paths)} video(s)" if video_paths else ""
        err.write(f"chatting with {len(image_paths)} image(s){clips}; {QUIT} or Ctrl-D ends\n> ")
        err.flush()
    for line in lines:
        text = line.strip()
        if text == QUIT:
            break
        if text:
            try:
                if conversation:
                    mark = next((m for m in (IMAGE_MARK, VIDEO_MARK) if m in text), None)
                    if mark:
                        raise BadInput(f"images and videos are given once, at the start; "
                                       f"remove {mark} from this turn")
                else:
                    text = chat_media.with_media_marks(text, len(image_paths), len(video_paths))
                turn = conversation + [{"from": "human", "value": text}]
                response = reply(bot, turn, pixels, **sampling)
            except BadInput as e:
                err.write(f"lvlm generate: {e}\n")
            else:
                conversation = turn + [{"from": "gpt", "value": response}]
                out.write(response + "\n")
                out.flush()
        if interactive:
            err.write("> ")
            err.flush()
    return conversation
