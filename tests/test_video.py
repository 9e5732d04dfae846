"""Video through the disaggregated path, in process: torch-only processing against transformers'
torchvision pipeline, the prompt layout, equality with transformers' generate, hostile clips."""

from pathlib import Path

import pytest
import torch
from clips import make_audio_only, make_clip
from reference import reference_greedy, reference_logits
from safetensors.torch import load_file

from qwen3vl_epd.encoder.cache import EncoderCache
from qwen3vl_epd.errors import InvalidInputError, VideoError
from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.prompt.layout import VIDEO_PLACEHOLDER
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.messages import parse_messages
from qwen3vl_epd.prompt.processor import Processor
from qwen3vl_epd.prompt.video_processing import VideoOptions, VideoProcessor
from qwen3vl_epd.prompt.videos import VideoInfo
from support.prompts import TOL, image_bytes

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).parent / "fixtures" / "video_processing.safetensors"
VIDEO_TOKEN_ID = 151656
CLIP = make_clip(frames=8, rate=4, width=96, height=72)  # 2 s: 4 frames at 2 fps, 2 temporal patches
CLIP_B = make_clip(frames=12, rate=6, width=64, height=64, fmt="webm", codec="libvpx-vp9")

CASES = {  # name → (text, images, videos, options)
    "one_clip": ("Describe this video.", [], [CLIP], VideoOptions()),
    "clip_and_image": ("Compare <image> with <video>.", ["small_64x64.webp"], [CLIP], VideoOptions()),
    "two_clips": ("What happens in <video> and then in <video>?", [], [CLIP, CLIP_B], VideoOptions(num_frames=5)),
}


def test_torch_processing_equals_the_torchvision_pipeline(processor):
    """Fixtures made once by transformers' Qwen3VLVideoProcessor with torchvision (see
    tests/make_video_fixtures.py for the command): pixels within 1e-6, grids and timestamps equal."""
    fixtures = load_file(FIXTURES)
    names = sorted({k.split(".")[0] for k in fixtures})
    assert len(names) == 4
    for name in names:
        fps, frames = fixtures[f"{name}.options"].tolist()
        video = processor.video_processor.process(bytes(fixtures[f"{name}.clip"].numpy()), 0,
                                                  VideoOptions(fps or None, int(frames) or None), Limits(), 10**6)
        assert video.grid_thw.tolist() == fixtures[f"{name}.grid_thw"].tolist(), name
        assert (video.pixel_values - fixtures[f"{name}.pixel_values"]).abs().max().item() <= 1e-6, name
        assert video.timestamps == fixtures[f"{name}.timestamps"].tolist(), name


def test_sampling_defaults_come_from_the_checkpoint_else_the_reference(tmp_path, checkpoint):
    bare = VideoProcessor(tmp_path)  # no video_preprocessor_config.json: the reference's defaults
    assert (bare.c.fps, bare.c.min_frames, bare.c.max_frames) == (2, 4, 768)
    assert bare.c.size == {"shortest_edge": 131072, "longest_edge": 786432}
    (tmp_path / "video_preprocessor_config.json").write_text('{"fps": 1, "min_frames": 2}')
    own = VideoProcessor(tmp_path)
    assert (own.c.fps, own.c.min_frames, own.c.max_frames) == (1, 2, 768) and own.fingerprint != bare.fingerprint
    ten_seconds = VideoInfo(40, 4.0, 96, 72)
    assert list(own.indices(ten_seconds, VideoOptions())) == [0, 4, 9, 13, 17, 22, 26, 30, 35, 39]  # 1 fps
    assert len(Processor(checkpoint).video_processor.indices(ten_seconds, VideoOptions(fps=0.5))) == 5


@pytest.mark.parametrize("fmt,codec", [("webm", "libvpx-vp9"), ("matroska", "libx264"), ("mp4", "mpeg4"),
                                       ("avi", "mpeg4")])
def test_containers_with_and_without_a_frame_count(processor, fmt, codec):
    """WebM and MKV streams report 0 frames: the packets are counted, and the clip is timed as an MP4."""
    video = processor.video_processor.process(make_clip(frames=10, rate=5, fmt=fmt, codec=codec), 0, VideoOptions(),
                                              Limits(), 10**6)
    assert video.grid_thw.tolist() == [2, 4, 6] and video.timestamps == [0.3, 1.5]


def test_the_prompt_lays_out_each_temporal_patch_with_its_time(processor):
    p = processor.process("What is this?", videos=[CLIP])
    text = processor.tokenizer.decode(p.fill_ids.tolist())
    t, h, w = p.video_grid_thw[0].tolist()
    assert (t, h, w) == (2, 4, 6) and p.video_timestamps == [[0.25, 1.5]]
    per_frame = "<|video_pad|>" * (h * w // 4)
    layout = (f"<0.2 seconds><|vision_start|>{per_frame}<|vision_end|>"
              f"<1.5 seconds><|vision_start|>{per_frame}<|vision_end|>")
    assert layout in text
    assert VIDEO_PLACEHOLDER not in text and "<|vision_start|><0.2" not in text  # no outer wrapper
    assert p.visual_spans == [(text_pos, h * w // 4) for text_pos in _pad_starts(p.fill_ids)]
    # M-RoPE: each temporal patch is placed like an image, after the timestamp text before it.
    first, n = p.visual_spans[0]
    pos = p.mrope_positions[:, first:first + n]
    assert (pos[0] == first).all() and pos[1].max() - pos[1].min() == h // 2 - 1
    assert p.mrope_positions[0, first + n] == first + max(h, w) // 2  # vision_end right after the frame


def _pad_starts(ids):
    pads = (ids == VIDEO_TOKEN_ID).int()
    return [i for i in range(len(pads)) if pads[i] and (i == 0 or not pads[i - 1])]


@pytest.fixture(scope="module")
def prompts(processor):
    return {k: processor.process(t, [image_bytes(i) for i in im], videos=v, video_options=o)
            for k, (t, im, v, o) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_halves_match_transformers(case, prompts, reference, encoder, language):
    """transformers' generate given the same pixel values and ids (pixel_values_videos, video_grid_thw)."""
    prompt = prompts[case]
    encoded = encoder.encode([prompt])[0]
    assert encoded.num_visual == int((prompt.fill_ids >= 151655).sum())
    ref_logits, ref_tokens = reference_logits(reference, prompt), reference_greedy(reference, prompt, 24)
    out = language.generate(encoded, SamplingParams(max_tokens=24), return_logits=True)
    assert (out.prompt_logits - ref_logits).abs().max().item() <= TOL
    assert out.tokens == ref_tokens
    chunked = language.generate(encoded, SamplingParams(max_tokens=24), chunk_size=max(8, encoded.length // 5))
    assert chunked.tokens == ref_tokens  # chunks cut through the clip: each carries its own DeepStack rows


def test_a_clip_packs_with_images_in_one_tower_forward(prompts, encoder):
    both = encoder.encode([prompts["clip_and_image"], prompts["two_clips"]])
    for b, key in zip(both, ["clip_and_image", "two_clips"]):
        alone = encoder.encode([prompts[key]])[0]
        # a batch's products round differently from one prompt's (relative 1e-5); a wrong row is off by O(1)
        torch.testing.assert_close(b.embeddings, alone.embeddings, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.deepstack, alone.deepstack, atol=1e-5, rtol=1e-5)


def test_the_encoder_cache_and_prefix_hashes_key_a_clip_by_content_and_sampling(checkpoint, encoder):
    processor, cache = Processor(checkpoint), EncoderCache(64 * 2**20)
    first = encoder.encode([processor.process("Hi", videos=[CLIP], cache=cache)], cache)[0]
    seen = encoder.images_encoded
    again_prompt = processor.process("Hi", videos=[CLIP], cache=cache)
    assert again_prompt.video_cached[0] is not None and again_prompt.pixel_values_videos.shape[0] == 0
    again = encoder.encode([again_prompt], cache)[0]
    assert encoder.images_encoded == seen and torch.equal(again.embeddings, first.embeddings)
    assert again.block_hashes() == first.block_hashes() and torch.equal(again.fill_ids, first.fill_ids)
    other = processor.process("Hi", videos=[CLIP], cache=cache, video_options=VideoOptions(num_frames=3))
    assert other.video_cached[0] is None and cache.misses >= 2
    assert other.encoded(*_rows(other)).block_hashes()[0] != first.block_hashes()[0]


def _rows(p):
    v = sum(n for _, n in p.visual_spans)
    return torch.zeros(v, 64), torch.zeros(v, 192)


HOSTILE = {  # name → (bytes, limits, what the message must say)
    "empty": (b"", {}, "it is empty (0 bytes)"),
    "not_a_video": (b"<html>hello</html>" * 50, {}, "not a video container"),
    "truncated_mp4": (CLIP[: len(CLIP) // 2], {}, "not a video container"),
    "truncated_webm": (CLIP_B[: len(CLIP_B) * 2 // 3], {}, "truncated"),
    "audio_only": (make_audio_only(), {}, "no video stream"),
    "one_frame": (make_clip(frames=1), {}, "a clip needs at least 2"),
    "enormous": (make_clip(frames=2, width=4096, height=2304), {}, "over the limit of 8294400 (max_video_pixels)"),
    "rotated": (make_clip(rotation=90), {}, "rotated by 90 degrees"),
    "variable_rate": (make_clip(pts=[0, 40, 80, 400, 440, 480, 520, 560]), {}, "variable frame rate"),
    "too_many_bytes": (CLIP, {"max_video_bytes": 1000}, "over the limit of 1000 bytes (max_video_bytes)"),
    "too_long": (make_clip(frames=40, rate=4), {"max_video_seconds": 5}, "over the limit of 5 s (max_video_seconds)"),
    "too_many_frames": (make_clip(frames=40, rate=4), {"max_video_frames": 8},
                        "over the limit of 8 (max_video_frames)"),
    "too_many_tokens": (CLIP, {"max_visual_tokens": 10}, "12 visual tokens (4 frames at 96x64) is over"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_clip_is_invalid_arg_naming_the_limit(name, checkpoint):
    data, limits, says = HOSTILE[name]
    processor = Processor(checkpoint, Limits(**limits))
    with pytest.raises(VideoError, match="video 0: ") as e:
        processor.process("What is this?", videos=[data])
    assert e.value.code == "INVALID_ARG" and says in str(e.value), str(e.value)


def test_decoding_a_clip_reports_progress_per_frame(checkpoint):
    """The encoder's liveness: a long decode keeps moving its progress (liveness.Progress.advance)."""
    processor, seen = Processor(checkpoint), []
    processor.on_progress = lambda: seen.append(1)
    processor.process("Hi", videos=[make_clip(frames=10, rate=5)])
    assert len(seen) == 10  # every frame up to the last one sampled


def test_bad_sampling_options_and_counts_name_the_field(processor):
    for options, says in [(VideoOptions(fps=0), "video_fps: 0 is outside"),
                          (VideoOptions(num_frames=1), "video_frames: 1"),
                          (VideoOptions(fps=2, num_frames=4), "send one of them")]:
        with pytest.raises(InvalidInputError, match=says):
            processor.process("Hi", videos=[CLIP], video_options=options)
    with pytest.raises(InvalidInputError, match="1 '<video>' markers but 2 videos"):
        processor.process("Look: <video>", videos=[CLIP, CLIP])
    with pytest.raises(InvalidInputError, match="over the limit of 4 per prompt"):
        processor.process("Hi", videos=[CLIP] * 5)


def test_video_parts_of_messages(processor):
    turns = ('[{"role": "user", "content": [{"type": "video"}, {"type": "image_url", "image_url": {"url": '
             '"data:image/png;base64,AAAA"}}, {"type": "video_url", "video_url": {"url": '
             '"data:video/mp4;base64,AAAA"}},'
             ' {"type": "text", "text": "Compare."}]}]')
    c = parse_messages(turns, [], [CLIP])
    assert c.videos == [CLIP, b"data:video/mp4;base64,AAAA"] and c.images == [b"data:image/png;base64,AAAA"]
    prompt = processor.apply_chat_template(c.turns)
    assert prompt.count(VIDEO_PLACEHOLDER) == 2
    with pytest.raises(InvalidInputError, match="remote video URLs are not fetched"):
        parse_messages('[{"role": "user", "content": [{"type": "video_url", "video_url": '
                       '{"url": "https://x/v.mp4"}}]}]')
    with pytest.raises(InvalidInputError, match=r"video: elements \[0\] of 1 are not used"):
        parse_messages('[{"role": "user", "content": "Hi"}]', [], [CLIP])
