"""`lvlm generate --image/--video` on an any-res + video model: the image is tiled, the clip's
frames sampled, the marks expanded to HF's placeholder runs, and the answer is the model's own
greedy answer on that MediaLayout; bad clips and images fail in one line with exit code 2."""

import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipelines.anyres import tile_image
from data_pipelines.loader import demo_tokenizer
from data_pipelines.templates import end_of_turn_ids, render
from data_pipelines.video import frames_to_crops, read_frames
from lvlm_jax import cli
from lvlm_jax.api import from_pretrained
from lvlm_jax.checkpoints.export import save_params_only
from lvlm_jax.models.media_layout import (
    Media,
    MediaLayout,
    build_layout,
    num_media_tokens,
    place_crops,
)
from lvlm_jax.models.vision import VisionEncoder
from lvlm_jax.models.vlm import VLM, dummy_inputs, normalize_pixels, vlm_config
from lvlm_jax.train.input_pipeline import cache_dir

CROP = 16
PINPOINTS = ((16, 32), (32, 16), (32, 32))
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
NEW_TOKENS = 6
TEMPLATE = "gemma"


def _write_clip(path: str, colours: np.ndarray, size=(24, 40)) -> None:
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            frame = av.VideoFrame.from_ndarray(np.broadcast_to(colour, (*size, 3)).copy(),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A params-only checkpoint of a tiny random any-res + video model with its run config."""
    base = tmp_path_factory.mktemp("generate_media")
    tok = demo_tokenizer(cache_dir())
    cfg = vlm_config({
        "vision": {"image_size": CROP, "patch_size": 8, "width": 16, "depth": 1, "mlp_dim": 32,
                   "num_heads": 2},
        "language": {"vocab_size": tok.vocab_size + 1, "embed_dim": 32, "num_layers": 1,
                     "num_heads": 2, "num_kv_heads": 2, "mlp_dim": 64, "head_dim": 16,
                     "max_length": 128},
        "image_token_id": tok.image_id, "image_newline": True,
        "image_grid_pinpoints": PINPOINTS, "video_token_id": tok.vocab_size,
        "video_pool": "average"})
    # Jitted: the eager init of even this tiny model dispatches for ~7 s.
    params = jax.jit(VLM(cfg).init)(jax.random.PRNGKey(1), **dummy_inputs(cfg))["params"]
    assert "image_newline" in params
    workdir = str(base / "run")
    save_params_only(cfg, nn.meta.unbox(params), workdir)
    data = {"template": TEMPLATE, "tokenizer": "", "image_size": CROP, "image_mode": "pad",
            "image_mean": MEAN, "image_std": STD, "num_frames": 4}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"data": data}, f)
    rng = np.random.default_rng(0)
    wide = str(base / "wide.png")
    Image.fromarray(rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)).save(wide)
    clip = str(base / "clip.mp4")
    _write_clip(clip, rng.integers(0, 256, (4, 3), dtype=np.uint8))
    vlm = from_pretrained(workdir)
    return {"workdir": workdir, "base": base, "image": wide, "clip": clip, "tok": tok,
            "vlm": vlm}


def _greedy(run, text: str, kind: str, crops: np.ndarray, media: Media) -> tuple[str, int]:
    """The answer by full forward passes (no KV cache, no left padding) on the MediaLayout
    built here from the library's pieces; also the placeholder count."""
    tok, vlm = run["tok"], run["vlm"]
    cfg, model = vlm.config, vlm.model
    # One placeholder for the mark, whichever its kind, expanded below.
    one = text.replace("<video>", "<image>")
    ids, _ = render(TEMPLATE, [{"from": "human", "value": one}], tok, 1,
                    add_generation_prompt=True)
    at = int(np.flatnonzero(ids == tok.image_id)[0])
    n = num_media_tokens(cfg, media)
    token = cfg.video_token_id if kind == "video" else cfg.image_token_id
    ids = np.concatenate([ids[:at], np.full(n, token), ids[at + 1:]]).astype(np.int32)
    length = len(ids) + NEW_TOKENS
    row = np.zeros((1, length), np.int32)
    row[0, :len(ids)] = ids
    mask = np.zeros((1, length), bool)
    mask[0, at:at + n] = True
    slots, weights, _ = build_layout(cfg, mask, [[media]], crops_per_group=media.crops)
    pixels, _ = place_crops([[crops]], crops_per_group=media.crops)
    layout = MediaLayout(normalize_pixels(pixels, MEAN, STD), slots, weights)
    forward = jax.jit(lambda p, i: model.apply({"params": p}, i, layout)[0])
    stops = {*end_of_turn_ids(TEMPLATE, tok), tok.eos_id}
    out = []
    for step in range(NEW_TOKENS):
        logits = forward(vlm.params, jnp.asarray(row))
        nxt = int(np.argmax(np.asarray(logits[0, len(ids) - 1 + step])))
        if nxt in stops:
            break
        out.append(nxt)
        row[0, len(ids) + step] = nxt
    kept = [t for t in out if t not in (tok.image_id, cfg.image_token_id, cfg.video_token_id)]
    return tok.decode(kept).strip(), n


def _generate(capsys, *flags):
    """`lvlm generate` in this process -> (exit code, stdout, stderr, crops per vision call)."""
    crops = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, VisionEncoder) and context.method_name == "__call__":
            crops.append(args[0].shape[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        code = cli.main(["generate", *flags, f"--max_new_tokens={NEW_TOKENS}"])
    out = capsys.readouterr()
    return code, out.out, out.err, crops


def test_wide_image_is_tiled_and_answers_as_the_model_greedily_does(run, capsys):
    prompt = "What is in the picture?"
    code, out, err, crops = _generate(capsys, f"--checkpoint={run['workdir']}",
                                      f"--image={run['image']}", f"--prompt={prompt}")
    assert code == 0, err
    tiles = tile_image(run["image"], PINPOINTS, CROP)
    assert tiles.grid == (1, 2)
    assert crops == [3]  # the global view and two tiles, encoded once
    media = Media(grid=tiles.grid, image_size=tiles.image_size)
    expected, n = _greedy(run, "<image>\n" + prompt, "image", tiles.crops, media)
    assert n == 4 + 2 * 4 + 2  # global view, a 2x4 tile map, a newline per row
    assert out.strip() == expected and expected


def test_four_frame_clip_answers_as_the_model_greedily_does(run, capsys):
    prompt = "What happens in the video?"
    code, out, err, crops = _generate(capsys, f"--checkpoint={run['workdir']}",
                                      f"--video={run['clip']}", f"--prompt=<video> {prompt}")
    assert code == 0, err
    assert crops == [4]  # the run's data.num_frames
    frames = read_frames(run["clip"], 4)
    media = Media(kind="video", frames=4)
    expected, n = _greedy(run, f"<video> {prompt}", "video", frames_to_crops(frames, CROP),
                          media)
    assert n == 4  # one 2x2-pooled token per frame
    assert out.strip() == expected and expected


@pytest.mark.parametrize("case", ["undecodable_video", "short_clip", "too_elongated_image",
                                  "marks_mismatch"])
def test_bad_media_fail_with_one_line_and_exit_2(run, capsys, case):
    flags = [f"--checkpoint={run['workdir']}", "--prompt=What is it?"]
    if case == "undecodable_video":
        bad = run["base"] / "broken.mp4"
        bad.write_bytes(b"\x00not a video" * 32)
        flags.append(f"--video={bad}")
        message = "broken.mp4' cannot be decoded"
    elif case == "short_clip":
        flags += [f"--video={run['clip']}", "--num_frames=8"]
        message = "clip has 4 frames, 8 asked"
    elif case == "too_elongated_image":
        thin = str(run["base"] / "thin.png")
        Image.new("RGB", (400, 4)).save(thin)
        flags.append(f"--image={thin}")
        message = "thin.png' cannot be tiled for this model: image 4x400"
    else:
        flags = [flags[0], f"--video={run['clip']}", "--prompt=<video><video> twice?"]
        message = "the prompt has 2 <video> marks but 1 video(s) were given"
    code, _, err, crops = _generate(capsys, *flags)
    assert code == 2 and crops == []
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("lvlm generate: ") and message in lines[-1], err


def test_chat_session_with_a_clip_keeps_it_for_later_turns(run):
    from lvlm_jax import chat

    bot = chat.load(run["workdir"])
    out, err = io.StringIO(), io.StringIO()
    conversation = chat.chat(bot, [], io.StringIO("Describe it.\nAgain <video>\n"), out, err,
                             video_paths=[run["clip"]], max_new_tokens=2)
    assert conversation[0]["value"].startswith("<video>\n")
    assert "remove <video> from this turn" in err.getvalue()
    assert len(out.getvalue().splitlines()) == 1
