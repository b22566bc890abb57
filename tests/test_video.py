"""Video frames on the host: uniform sampling, mp4 / bytes / frame-folder reading, HF's frame
crops, and one VideoError naming each kind of bad clip."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines.video import (
    VideoError,
    count_frames,
    frames_to_crops,
    read_frames,
    sample_indices,
)

# Ten flat colours far apart in YUV, so lossy coding keeps each frame's identity.
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                    [255, 0, 255], [128, 128, 128], [255, 255, 255], [0, 0, 0],
                    [64, 128, 192]], np.uint8)


def write_clip(colours: np.ndarray, path=None, size=(24, 32), codec="mpeg4",
               fmt="mp4") -> bytes:
    """A clip with one flat frame per colour (PyAV); written to `path` too when given."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for colour in colours:
            frame = np.broadcast_to(colour, (*size, 3)).copy()
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


def which_colours(frames: np.ndarray) -> list[int]:
    """The index in COLOURS nearest to each frame's mean colour."""
    means = frames.reshape(len(frames), -1, 3).mean(axis=1)
    return np.abs(means[:, None] - COLOURS[None].astype(float)).sum(-1).argmin(-1).tolist()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "colours.mp4"
    return str(path), write_clip(COLOURS, path)


def test_sample_indices_match_hf_video_processors():
    video_utils = pytest.importorskip("transformers.video_utils")
    for total, n in [(10, 5), (10, 4), (7, 7), (300, 8), (9, 1), (32, 3)]:
        meta = video_utils.VideoMetadata(total_num_frames=total, fps=10.0)
        expected = video_utils.default_sample_indices_fn(meta, num_frames=n)
        np.testing.assert_array_equal(sample_indices(total, n), expected)
    np.testing.assert_array_equal(sample_indices(10, 4), [0, 2, 5, 7])


def test_mp4_file_gives_the_uniformly_sampled_frames(clip):
    path, _ = clip
    assert count_frames(path) == 10
    frames = read_frames(path, 4)
    assert frames.dtype == np.uint8 and frames.shape == (4, 24, 32, 3)
    assert which_colours(frames) == [0, 2, 5, 7]
    # Flat frames stay flat and near their colour through mpeg4 coding.
    np.testing.assert_allclose(frames.reshape(4, -1, 3).mean(1), COLOURS[[0, 2, 5, 7]], atol=6)
    assert which_colours(read_frames(path, 10)) == list(range(10))


def test_bytes_give_the_same_frames_as_the_file(clip):
    path, data = clip
    np.testing.assert_array_equal(read_frames(data, 5), read_frames(path, 5))
    assert which_colours(read_frames(data, 5)) == [0, 2, 4, 6, 8]
    assert count_frames(data) == 10


def test_h264_clip_decodes_in_order():
    import av

    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 encoder")
    data = write_clip(COLOURS[:6], codec="libx264", size=(32, 32))  # B-frames reorder packets
    assert which_colours(read_frames(data, 6)) == list(range(6))


def test_clip_without_a_frame_count_in_its_header_is_counted_by_its_packets():
    import av

    data = write_clip(COLOURS, fmt="matroska")
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].frames == 0
    assert count_frames(data) == 10
    assert which_colours(read_frames(data, 4)) == [0, 2, 5, 7]


def test_frame_folder_reads_frames_in_natural_name_order(tmp_path):
    for i, colour in enumerate(COLOURS):  # frame_2 sorts before frame_10, as a user means it
        Image.fromarray(np.broadcast_to(colour, (8, 12, 3)).copy()).save(
            tmp_path / f"frame_{i + 1}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_frames(tmp_path, 5)
    assert frames.shape == (5, 8, 12, 3)
    np.testing.assert_array_equal(frames[:, 0, 0], COLOURS[[0, 2, 4, 6, 8]])


def test_frames_to_crops_resizes_the_short_edge_and_centre_crops():
    image_transforms = pytest.importorskip("transformers.image_transforms")
    rng = np.random.default_rng(0)
    for h, w, size in [(24, 40, 16), (50, 30, 16), (20, 20, 8), (7, 33, 12)]:
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        crops = frames_to_crops(frames, size)
        assert crops.shape == (2, size, size, 3) and crops.dtype == np.uint8
        # HF's LlavaNextVideo default: shortest_edge resize, keep aspect, then centre crop.
        new_h, new_w = image_transforms.get_resize_output_image_size(
            frames[0], size, default_to_square=False, input_data_format="channels_last")
        top, left = int((new_h - size) / 2), int((new_w - size) / 2)
        for frame, crop in zip(frames, crops, strict=True):
            resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h),
                                                               Image.Resampling.BICUBIC))
            np.testing.assert_array_equal(crop, resized[top:top + size, left:left + size])
    # A wide frame keeps its middle: the left and right stripes are cut off.
    wide = np.zeros((1, 20, 100, 3), np.uint8)
    wide[:, :, :20] = 255
    wide[:, :, 80:] = 255
    assert frames_to_crops(wide, 10).max() == 0


@pytest.mark.parametrize("case", ["missing", "not_a_video", "garbage_bytes", "too_short",
                                  "empty_folder", "short_folder", "truncated"])
def test_bad_clips_raise_one_video_error(tmp_path, clip, case):
    path, data = clip
    source, frames = path, 4
    if case == "missing":
        source, message = str(tmp_path / "nope.mp4"), "nope.mp4' does not exist"
    elif case == "not_a_video":
        source = str(tmp_path / "notes.mp4")
        (tmp_path / "notes.mp4").write_text("just text " * 20)
        message = "notes.mp4' cannot be decoded"
    elif case == "garbage_bytes":
        source, message = b"\x00\x01" * 64, "video <128 bytes> cannot be decoded"
    elif case == "too_short":
        source = write_clip(COLOURS[:3])
        frames, message = 8, "clip has 3 frames, 8 asked"
    elif case == "empty_folder":
        source, message = str(tmp_path), "has no frame images"
    elif case == "short_folder":
        for i in range(2):
            Image.new("RGB", (4, 4)).save(tmp_path / f"{i}.jpg")
        source, message = str(tmp_path), "clip has 2 frames, 4 asked"
    else:  # the moov atom at the end is lost with the second half
        source, message = data[:len(data) // 2], "has no video stream (not a video, or cut short)"
    with pytest.raises(VideoError, match=re.escape(message)) as info:
        read_frames(source, frames)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_convert_stores_video_bytes_and_skips_bad_clips_by_reason(tmp_path, clip):
    from data_pipelines.arrayrecord_source import ArrayRecordSource
    from data_pipelines.convert import convert

    _, data = clip
    (tmp_path / "clip.mp4").write_bytes(data)
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 16)
    (tmp_path / "frames").mkdir()

    def record(rid, video, text="<video>\nWhat happens?"):
        return {"id": rid, "video": video,
                "conversations": [{"from": "human", "value": text},
                                  {"from": "gpt", "value": "Colours change."}]}

    records = [record("good", "clip.mp4"), record("missing", "nope.mp4"),
               record("broken", "broken.mp4"), record("folder", "frames"),
               record("no_mark", "clip.mp4", "What happens?"),
               {"id": "two", "videos": ["clip.mp4", "clip.mp4"],
                "conversations": [{"from": "human", "value": "<video><video> Same?"},
                                  {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "videos.json").write_text(json.dumps(records))
    report = convert("llava", tmp_path / "videos.json", None, tmp_path / "out", workers=1,
                     verbose=False)
    assert report.converted == 2
    assert report.skipped_ids == {"missing_video": ["missing"],
                                  "unreadable_video": ["broken", "folder"],
                                  "video_count_mismatch": ["no_mark"]}
    source = ArrayRecordSource(str(tmp_path / "out"))
    good, two = source[0], source[1]
    assert good["video"] == data and good["video_file"] == "clip.mp4" and good["images"] == []
    assert which_colours(read_frames(good["video"], 4)) == [0, 2, 5, 7]
    assert two["videos"] == [data, data] and "video" not in two
