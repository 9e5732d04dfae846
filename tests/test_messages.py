"""The `messages` input: conversations in the OpenAI chat layout, rendered by the chat template."""

import base64
import json

import pytest

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.prompt.messages import parse_messages
from qwen3vl_epd.prompt.processor import VISION_PLACEHOLDER
from support.prompts import image_bytes

pytestmark = pytest.mark.unit

A, B = image_bytes("small_64x64.webp"), image_bytes("portrait_300x500.png")


def conversation(*turns):
    return json.dumps(list(turns))


def test_turns_keep_their_roles_and_images_their_order(processor):
    url = "data:image/png;base64," + base64.b64encode(B).decode()
    c = parse_messages(conversation(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": 1}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "image"}, {"type": "text", "text": "?"}]},
    ), [A, B])
    assert c.images == [B, url.encode(), A]  # index 1, the data URL, then the first implicit one: 0
    prompt = processor.apply_chat_template(c.turns)
    assert prompt.count(VISION_PLACEHOLDER) == 3
    assert [line.split("\n")[0] for line in prompt.split("<|im_start|>")[1:]] == \
        ["system", "user", "assistant", "user", "assistant"]
    assert "A cat.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    # the data URL decodes to the same pixels as the raw bytes
    p = processor.process(prompt, c.images, raw_prompt=True)
    assert p.num_images == 3 and p.image_sizes[0] == p.image_sizes[1]


def test_a_plain_user_message_renders_as_text_input_does(processor):
    c = parse_messages(conversation({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}),
                       [A])
    assert processor.apply_chat_template(c.turns) == processor.build_prompt("Hi", 1)


BAD = [
    ("[{", "messages: not valid JSON"),
    ("{}", "messages: must be a non-empty JSON array of turns"),
    ("[]", "messages: must be a non-empty JSON array of turns"),
    (conversation({"role": "robot", "content": "x"}), "messages: turn 0: unknown role 'robot'"),
    (conversation("hi"), "messages: turn 0: must be an object with role and content"),
    (conversation({"role": "user", "content": 3}), "turn 0 (user): content must be a string or a list of parts"),
    (conversation({"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "audio"}]}),
     "messages: turn 1 (user) part 0: unsupported part type 'audio'"),
    (conversation({"role": "user", "content": [{"type": "text", "text": 5}]}), "part 0: a text part needs a string"),
    (conversation({"role": "user", "content": [{"type": "image", "image": 2}]}),
     "turn 0 (user) part 0: image index 2 is out of range (2 images sent)"),
    (conversation({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                                               {"type": "image"}, {"type": "image"}]}),
     "part 0: remote image URLs are not fetched"),
    (conversation({"role": "user", "content": [{"type": "image", "image": 0}]}),
     "image: elements [1] of 2 are not used by any messages part"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_conversations_name_the_turn_and_part(text, message):
    with pytest.raises(InvalidInputError) as e:
        parse_messages(text, [A, B])
    assert message in str(e.value)
