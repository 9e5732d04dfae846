"""Video end to end through a real tritonserver and its OpenAI server: greedy tokens equal
transformers' generate, clips pulled in several chunks, hostile clips refused with nothing lost."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from clips import make_audio_only, make_clip
from reference import reference_greedy

from client import RequestError, data_url, generate, text_of
from qwen3vl_epd.prompt.messages import parse_messages
from qwen3vl_epd.prompt.video_processing import VideoOptions
from support.prompts import image_bytes
from support.tritonserver import TritonServer, start_openai_server

pytestmark = pytest.mark.triton

MAX_TOKENS = 12
CHUNK = 64  # prompt tokens per pull: every clip below arrives in several chunks
CLIP = make_clip(frames=8, rate=4, width=320, height=240)
CLIP_B = make_clip(frames=12, rate=6, width=192, height=160, fmt="webm", codec="libvpx-vp9")
CASES = {  # name → (text, images, videos, sampling fields)
    "one_clip": ("Describe this video.", [], [CLIP], {}),
    "clip_and_image": ("Compare <image> with <video>.", ["small_64x64.webp"], [CLIP], {}),
    "two_clips": ("What happens in <video> and then in <video>?", [], [CLIP, CLIP_B], {"video_frames": 5}),
}


def video_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    s = TritonServer(tmp_path_factory.mktemp("video") / "server.log",
                     env={"EPD_CHECKPOINT": checkpoint, "EPD_CHUNK_TOKENS": str(CHUNK)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server):
    """The OpenAI server in front of it (started by hand: the supervisor's probes would move the counters)."""
    frontend, base = start_openai_server(server.grpc_url, "--served-model-name", "tiny")
    yield openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    frontend.kill()
    frontend.wait()


def greedy_text(processor, reference, prompt) -> tuple[str, int]:
    tokens = reference_greedy(reference, prompt, MAX_TOKENS)
    return processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


@pytest.fixture(scope="module")
def expected(processor, reference):
    out = {}
    for case, (text, images, videos, fields) in CASES.items():
        prompt = processor.process(text, [image_bytes(i) for i in images], videos=videos,
                                   video_options=VideoOptions(num_frames=fields.get("video_frames")))
        assert prompt.fill_ids.numel() > 2 * CHUNK and prompt.num_videos == len(videos)
        out[case] = greedy_text(processor, reference, prompt)
    return out


@pytest.mark.parametrize("route", ["language-grpc-stream", "ensemble-http", "complete-http"])
@pytest.mark.parametrize("case", list(CASES))
def test_endpoints_equal_transformers(server, expected, case, route):
    model, protocol, *stream = route.split("-")
    text, images, videos, fields = CASES[case]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    got, last = text_of(generate(url, text, [image_bytes(i) for i in images], protocol, bool(stream), model=model,
                                 videos=videos, max_tokens=MAX_TOKENS, **fields))
    assert (got, last.num_output_tokens) == expected[case]


@pytest.mark.parametrize("case", list(CASES))
def test_openai_video_url_equals_transformers(sdk, processor, reference, case):
    """video_url parts (data URLs), with an image, and vLLM's mm_processor_kwargs for the frames."""
    text, images, videos, fields = CASES[case]
    parts = [{"type": "image_url", "image_url": {"url": data_url(image_bytes(i))}} for i in images]
    parts += [{"type": "video_url", "video_url": {"url": video_url(v)}} for v in videos]
    turns = [{"role": "user", "content": [*parts, {"type": "text", "text": text.replace("<image>", "the image")
                                                   .replace("<video>", "the video")}]}]
    c = parse_messages(json.dumps(turns))
    options = VideoOptions(num_frames=fields.get("video_frames"))
    prompt = processor.process(processor.apply_chat_template(c.turns), c.images, raw_prompt=True, videos=c.videos,
                               video_options=options)
    want, n = greedy_text(processor, reference, prompt)
    extra = {"mm_processor_kwargs": {"num_frames": options.num_frames}} if options.num_frames else {}
    r = sdk.chat.completions.create(model="tiny", messages=turns, max_tokens=MAX_TOKENS, extra_body=extra)
    assert r.choices[0].message.content == want and r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == prompt.fill_ids.numel()


def test_openai_refuses_remote_and_broken_clips(sdk):
    with pytest.raises(openai.BadRequestError, match="remote video URLs are not fetched"):
        sdk.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/clip.mp4"}}]}])
    with pytest.raises(openai.BadRequestError, match="video 0: cannot decode video"):
        sdk.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_url(b"not a video" * 20)}}]}])
    with pytest.raises(openai.BadRequestError, match="mm_processor_kwargs"):
        sdk.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"mm_processor_kwargs": {"max_pixels": 4}})


HOSTILE = {
    "truncated": (CLIP_B[: len(CLIP_B) * 2 // 3], "truncated"),
    "audio_only": (make_audio_only(), "no video stream"),
    "not_a_video": (b"GIF89a" + bytes(300), "cannot decode video"),
    "rotated": (make_clip(rotation=270), "rotated by 270 degrees"),
    "variable_rate": (make_clip(pts=[0, 40, 80, 400, 440, 480, 520, 560]), "variable frame rate"),
    "enormous": (make_clip(frames=2, width=4096, height=2304), "(max_video_pixels)"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_hostile_clips_are_invalid_arg_and_lose_nothing(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    for name, (data, says) in HOSTILE.items():
        with pytest.raises(RequestError) as e:
            text_of(generate(url, "Look <video> <image>", [image_bytes("small_64x64.webp")], protocol, True,
                             videos=[data], max_tokens=4))
        assert e.value.code == "INVALID_ARG" and "video 0: " in e.value.message and says in e.value.message, name
    with pytest.raises(RequestError, match="video_frames: 1 is outside"):
        text_of(generate(url, "Hi", [], protocol, videos=[CLIP], video_frames=1))
    server.assert_pools_empty()
    assert text_of(generate(url, "Still there?", protocol=protocol, max_tokens=2))[1].num_output_tokens == 2


def test_a_repeated_clip_is_encoded_once_and_its_prefix_reused(server):
    clip = make_clip(frames=10, rate=5, width=80, height=48)  # no other test sends it
    hits = lambda: server.metric_values("epd_prefix_cache_hit_tokens_total")[""]  # noqa: E731
    towers = lambda: sum(server.metric_values("epd_vision_images_total").values())  # noqa: E731
    before, hit = towers(), hits()
    answers = {text_of(generate(server.grpc_url, "What moves in <video>?", videos=[clip], max_tokens=6))[0]
               for _ in range(3)}
    time.sleep(0.3)
    assert towers() - before == 1 and len(answers) == 1 and hits() > hit
    other = text_of(generate(server.grpc_url, "What moves in <video>?", videos=[clip], max_tokens=6, video_fps=4.0))
    time.sleep(0.3)
    assert towers() - before == 2 and other[1].num_input_tokens > 0  # other sampling: another encode


def test_text_only_never_waits_behind_a_video_encode(server):
    """A text prompt sent while a long clip is being decoded and encoded answers before that encode ends."""
    encodes = lambda: sum(server.metric_values("epd_encode_requests_total").values())  # noqa: E731
    long_clip = make_clip(frames=240, rate=4, width=640, height=480, codec="mpeg4")  # seconds on the tiny tower
    before = encodes()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(lambda: text_of(generate(server.grpc_url, "Describe.", videos=[long_clip], max_tokens=1)))
        time.sleep(0.5)
        first = next(iter(generate(server.grpc_url, "Hi!", stream=True, max_tokens=4)))
        assert first.text and encodes() == before, "the text-only request waited for the clip's encode"
        assert job.result()[1].num_output_tokens == 1
    server.assert_pools_empty()
