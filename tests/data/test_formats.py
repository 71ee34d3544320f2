"""Record -> Conversation for LLaVA, messages and HF rows; media resolution and opening."""
from __future__ import annotations

import pytest
from PIL import Image

from qwenvl.data import (Conversation, DataError, DatasetSpec, open_annotations, open_image,
                         resolve_media, to_conversation, to_conversations)
from qwenvl.data.errors import DataKind

SPEC = DatasetSpec("demo", "/data/anns/demo.json", "/data/images")


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(ref) -> dict:
    return {"type": "image", "image": ref}


def video(ref) -> dict:
    return {"type": "video", "video": ref}


# ----------------------------------------------------------------------------- LLaVA

def test_llava_single_image_keeps_text_exactly():
    record = {"image": "coco/1.jpg", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat.\n"}]}
    conv = to_conversation(record, SPEC, 7)
    assert isinstance(conv, Conversation)
    assert conv.origin == "dataset 'demo', file /data/anns/demo.json, record 7"
    assert conv.messages == [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [image("/data/images/coco/1.jpg"), text("\nWhat is this?")]},
        {"role": "assistant", "content": [text("A cat.\n")]},
    ]


def test_llava_media_follow_tag_order_across_turns():
    record = {"image": ["a.jpg", "b.jpg", "c.jpg"], "video": "v.mp4", "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."},
        {"from": "gpt", "value": "Done."},
        {"from": "human", "value": "<video><image>Now?"},
        {"from": "gpt", "value": "Yes."}]}
    msgs = to_conversation(record, SPEC, 0).messages
    assert msgs[0]["content"] == [text("Compare "), image("/data/images/a.jpg"), text(" and "),
                                  image("/data/images/b.jpg"), text(".")]
    assert msgs[2]["content"] == [video("/data/images/v.mp4"), image("/data/images/c.jpg"),
                                  text("Now?")]


def test_llava_video_as_frames_and_text_only():
    record = {"video": [["f/0.jpg", "f/1.jpg"]], "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "x"}]}
    msgs = to_conversation(record, SPEC, 0).messages
    assert msgs[0]["content"][0] == video(["/data/images/f/0.jpg", "/data/images/f/1.jpg"])
    plain = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ho"}]}
    assert to_conversation(plain, DatasetSpec("t", "t.jsonl"), 0).messages[1] == {
        "role": "assistant", "content": [text("Ho")]}


def test_llava_images_without_tags_is_an_error_with_the_fix():
    record = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]}
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 3)
    msg = str(info.value)
    assert msg.startswith("dataset 'demo', file /data/anns/demo.json, record 3:")
    assert "0 image placeholder(s) but 1 image(s) given. Fix: put one <image> tag" in msg


def test_llava_more_tags_than_media_and_frame_hint():
    record = {"image": "a.jpg", "video": ["0.jpg", "1.jpg"], "conversations": [
        {"from": "human", "value": "<image><image><video>"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 0)
    msg = str(info.value)
    assert "2 image placeholder(s) but 1 image(s) given" in msg
    assert "1 video placeholder(s) but 2 video(s) given" in msg and "nest them" in msg


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "humann", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "turn 0: unknown 'from' 'humann'. Did you mean 'human'?"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
    ({"conversations": []}, "'conversations' is empty"),
    ({"conversations": [{"from": "human", "value": ["x"]}, {"from": "gpt", "value": "y"}]},
     "turn 0: 'value' must be a string, got list"),
    ({"conversations": ["hello"]}, "turn 0: expected {\"from\""),
    ({"question": "x", "answer": "y"}, "no 'conversations' (LLaVA / sharegpt), 'messages' or 'prompt' + 'completion' (TRL) key"),
    ({"image": "a", "images": ["b"], "conversations": []}, "both 'image' and 'images'"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<Image>\nx"}, {"from": "gpt", "value": "y"}]},
     ("0 image placeholder(s) but 1 image(s) given. Fix: put one <image> tag (or {\"type\": \"image\"} part) per "
      "image, where it belongs in the text, or correct the list of images. Also: The text holds <Image>; tags are "
      "lower case: <image>, <video>.")),
])
def test_llava_validation_names_the_record(record, expected):
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 12)
    assert "dataset 'demo', file /data/anns/demo.json, record 12" in str(info.value)
    assert expected in str(info.value)


def test_conversations_with_role_content_turns_read_as_messages():
    """Many Hugging Face datasets (and LLaMA-Factory sharegpt with role/content tags) write
    ``conversations`` as messages; they were refused as "unknown 'from' None"."""
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Colour?"},
             {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    as_conversations = to_conversation({"image": "x.png", "conversations": turns}, SPEC, 0).messages
    assert as_conversations == to_conversation({"images": ["x.png"], "messages": turns}, SPEC, 0).messages
    assert as_conversations[1]["content"] == [image("/data/images/x.png"), text("Colour?")]


def test_conversations_mixing_from_and_role_turns_name_the_turn():
    record = {"conversations": [{"from": "human", "value": "x"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="record 3, turn 1: unknown 'from' None"):
        to_conversation(record, SPEC, 3)


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_under_the_names_datasets_use_is_reasoning_content(key):
    """TRL's gpt-oss datasets write ``thinking``, vLLM/OpenRouter ``reasoning``: both were dropped
    silently (the turn trained without its reasoning)."""
    record = {"messages": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4", key: "add them", "weight": 1}]}
    assert to_conversation(record, SPEC, 0).messages[1] == {"role": "assistant", "content": [text("4")],
                                                            "reasoning_content": "add them"}


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "q", "weight": 0},
                   {"role": "assistant", "content": "a", "thinking": "r", "reasoning_content": "r"}]},
     "turn 1: reasoning given twice, as 'reasoning_content' and 'thinking'"),
])
def test_turn_fields_that_would_train_silently_wrong_are_refused(record, expected):
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 8)
    assert "record 8, " + expected in str(info.value) and "Fix:" in str(info.value)


# ----------------------------------------------------------------------------- per-turn training switches

def _two_answers(key, value, layout="messages") -> dict:
    if layout == "sharegpt":
        return {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", key: value},
                                  {"from": "human", "value": "r"}, {"from": "gpt", "value": "b"}]}
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: value},
                         {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
@pytest.mark.parametrize("key, off, on", [("weight", 0, 1), ("weight", 0.0, 1.0), ("loss", False, True)])
def test_openai_weight_and_ms_swift_loss_switch_an_assistant_turn(layout, key, off, on):
    """OpenAI's fine-tuning format ("weight": 0/1) and ms-swift's ("loss": false/true): 0/false marks the
    turn untrained (it was refused: every turn trained); 1/true, null or no key trains it as before."""
    conversation = to_conversation(_two_answers(key, off, layout), SPEC, 0)
    assert conversation.messages[1] == {"role": "assistant", "content": [text("a")], "trained": False}
    assert [conversation.trains(i) for i in range(4)] == [False, False, False, True]
    for value in (on, None):
        record = _two_answers(key, value, layout)
        (record.get("messages") or record["conversations"])[1]["loss_scale"] = 1.0  # ms-swift's default: fine
        trained = to_conversation(record, SPEC, 0)
        assert trained.messages[1] == {"role": "assistant", "content": [text("a")]}
        assert [trained.trains(i) for i in range(4)] == [False, True, False, True]


def test_a_switched_off_function_call_turn_is_untrained_context():
    record = {"tools": [{"name": "f", "parameters": {}}], "conversations": [
        {"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}',
                                          "loss": False},
        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "one"}]}
    conversation = to_conversation(record, SPEC, 0)
    assert conversation.messages[1]["tool_calls"] and not conversation.trains(1) and conversation.trains(3)


def test_untrained_turns_of_a_completion_and_switches_that_agree_with_the_prompt():
    """A completion's own turns can be switched off; a prompt's turns are context with or without a 0/false."""
    record = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                         {"role": "user", "content": "r"}],
              "completion": [{"role": "assistant", "content": "call", "loss": False},
                             {"role": "assistant", "content": "b"}]}
    conversation = to_conversation(record, SPEC, 0)
    assert [conversation.trains(i) for i in range(5)] == [False, False, False, False, True]


@pytest.mark.parametrize("turn, value, expected", [
    (1, "false", "'loss': 'false' is not a training switch (ms-swift: false or true)"),
    (1, 0.5, "'loss': 0.5 is not a training switch"),
    (1, 2, "'loss': 2 is not a training switch"),
    (1, [0], "'loss': [0] is not a training switch"),
    (0, True, "'loss': True asks to train a user turn; only assistant turns are trained"),
])
def test_switch_values_other_than_0_1_false_true_are_refused_naming_the_turn(turn, value, expected):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    record["messages"][turn]["loss"] = value
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 8)
    message = str(info.value)
    assert f"dataset 'demo', file /data/anns/demo.json, record 8, turn {turn}: {expected}" in message
    assert "Fix:" in message


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": "0"}]},
     "turn 1: 'weight': '0' is not a training switch (OpenAI's fine-tuning format: 0 or 1). Fix: write 'weight': 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0,
                                                      "loss": False}]},
     "turn 1: both 'weight' and 'loss' are given. Fix: keep one"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1},
                 {"role": "user", "content": "r"}], "completion": [{"role": "assistant", "content": "b"}]},
     "turn 1: 'weight': 1 asks to train an assistant turn inside 'prompt'"),
    ({"conversations": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}]},
     "turn 0: 'weight': 1 asks to train a user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_scale": 2.0}]},
     "turn 1: 'loss_scale': 2.0; per-turn loss scales are not supported"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_scale": 0.0,
                                                      "loss": True}]},
     "turn 1: 'loss_scale': 0.0; per-turn loss scales are not supported"),
])
def test_switches_that_cannot_mean_what_they_say_are_refused(record, expected):
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 8)
    assert "record 8, " + expected in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "loss": False},
                       {"from": "human", "value": "r"}, {"from": "gpt", "value": "b", "loss": False}]},
    {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a",
                                                                    "loss": False}]},
])
def test_a_record_whose_every_answer_is_switched_off_has_nothing_to_train(record):
    """The same bad record as one without an answer (``no_assistant``: --bad_sample_policy skips or stops)."""
    with pytest.raises(DataError) as info:
        to_conversation(record, SPEC, 8)
    assert info.value.kind == DataKind.NO_ASSISTANT
    assert "record 8: every assistant turn is marked untrained" in str(info.value) and "Fix:" in str(info.value)


# ----------------------------------------------------------------------------- messages

def test_messages_string_content_with_tags():
    record = {"images": ["x.png"], "messages": [
        {"role": "user", "content": "<image>Describe.\n"},
        {"role": "assistant", "content": "Red square."}]}
    assert to_conversation(record, SPEC, 0).messages == [
        {"role": "user", "content": [image("/data/images/x.png"), text("Describe.\n")]},
        {"role": "assistant", "content": [text("Red square.")]}]


def test_messages_parts_inline_and_listed_media():
    record = {"images": ["listed.png"], "videos": ["clip.mp4"], "messages": [
        {"role": "user", "content": [
            {"type": "image", "image": "s3://bucket/inline.png"},
            {"type": "image"},
            {"type": "video"},
            {"type": "image_url", "image_url": {"url": "https://example.com/u.png"}},
            {"type": "video", "video": ["/abs/0.jpg", "rel/1.jpg"]},
            {"type": "text", "text": "What differs?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Colour."}]}]}
    assert to_conversation(record, SPEC, 0).messages[0]["content"] == [
        image("s3://bucket/inline.png"), image("/data/images/listed.png"),
        video("/data/images/clip.mp4"), image("https://example.com/u.png"),
        video(["/abs/0.jpg", "/data/images/rel/1.jpg"]), text("What differs?")]


@pytest.mark.parametrize("record, expected", [
    ({"messages": [{"role": "usr", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "unknown role 'usr'. Did you mean 'user'?"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
     "'content' must be a string or a list of parts, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]},
                   {"role": "assistant", "content": "y"}]}, "needs a string 'text'"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]},
                   {"role": "assistant", "content": "y"}]}, "unknown content part type 'audio'"),
    ({"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "y"}]},
     "1 image placeholder(s) but 2 image(s) given"),
])
def test_messages_validation(record, expected):
    with pytest.raises(DataError, match="record 5") as info:
        to_conversation(record, SPEC, 5)
    assert expected in str(info.value)


def test_hf_row_like_llava_instruct_mix(tmp_path):
    """trl-lib/llava-instruct-mix: {"type": "image"} placeholders and PIL images in `images`."""
    datasets = pytest.importorskip("datasets")
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    rows = {"messages": [[
        {"role": "user", "content": [{"type": "image", "text": None},
                                     {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]],
        "images": [[red]]}
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"),
                                   "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    spec = DatasetSpec("mix", str(tmp_path / "hf"))
    conv = to_conversation(open_annotations(spec.annotation_path)[0], spec, 0)
    user = conv.messages[0]["content"]
    assert user[0]["type"] == "image" and isinstance(user[0]["image"], Image.Image)
    assert user[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert user[1] == text("What colour?")
    assert conv.messages[1] == {"role": "assistant", "content": [text("Red.")]}


def test_hf_rows_merged_from_two_layouts_read_the_column_each_row_fills(tmp_path, make_image):
    """A saved dataset built from rows of different layouts has every column in every row, null where a
    row lacks it: a null 'image' must not hide the row's 'images', a null 'prompt' is named as null."""
    datasets = pytest.importorskip("datasets")
    make_image(tmp_path / "imgs" / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                 {"from": "gpt", "value": "Red."}]},
            {"images": ["a.png"], "messages": [{"role": "user", "content": "<image>Colour?"},
                                               {"role": "assistant", "content": "Red."}]},
            {"prompt": None, "completion": "Red."}]
    columns = sorted({key for row in rows for key in row})  # as loading JSON lines of these rows gives
    datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}).save_to_disk(str(tmp_path / "hf"))
    spec = DatasetSpec("mixed", str(tmp_path / "hf"), str(tmp_path / "imgs"))
    source = open_annotations(spec.annotation_path)
    assert source[1]["image"] is None and source[1]["images"] == ["a.png"]  # the case this test is about
    for i in (0, 1):
        user = to_conversation(source[i], spec, i).messages[0]["content"]
        assert user[0] == image(str(tmp_path / "imgs" / "a.png")), i
    with pytest.raises(DataError, match=r"record 2: 'conversations' and 'messages' and 'prompt' are null"):
        to_conversation(source[2], spec, 2)


def test_openai_image_url_parts_with_base64_data_urls(tmp_path, make_image):
    """OpenAI-style messages carry images inline as data: URLs: they train as the same image in a file
    (they were joined to data_path as file names and reported missing); bad ones are named bad media."""
    import base64

    import numpy as np

    from qwenvl.data.errors import DataKind
    path = make_image(tmp_path / "red.png", color=(200, 10, 10), size=(30, 20))
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    def ask(part):
        return {"messages": [{"role": "user", "content": [part, text("Colour?")]},
                             {"role": "assistant", "content": "Red."}]}
    conv = to_conversation(ask({"type": "image_url", "image_url": {"url": url}}), SPEC, 0)
    inline = conv.messages[0]["content"][0]["image"]
    assert np.array_equal(np.asarray(open_image(inline)), np.asarray(open_image(str(path))))
    llava = {"image": url, "conversations": [{"from": "human", "value": "<image>Colour?"},
                                             {"from": "gpt", "value": "Red."}]}
    assert isinstance(to_conversation(llava, SPEC, 0).messages[0]["content"][0]["image"], Image.Image)
    for part, kind, message in [
            ({"type": "image_url", "image_url": {"url": url + "!"}}, DataKind.BAD_IMAGE,
             "does not hold base64 data"),
            ({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}, DataKind.BAD_IMAGE,
             "does not hold an image"),
            ({"type": "video", "video": url}, DataKind.BAD_VIDEO, "a video is given as image bytes")]:
        with pytest.raises(DataError, match=f"record 3: .*{message}.* Fix: ") as err:
            to_conversation(ask(part), SPEC, 3)
        assert err.value.kind is kind


def test_a_nested_list_of_images_is_named_not_opened(tmp_path):
    record = {"image": [["a.png"]], "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                      {"from": "gpt", "value": "Red."}]}
    with pytest.raises(DataError, match=r"record 2: an image is given as a list \['a.png'\].*Fix: "):
        to_conversation(record, SPEC, 2)


def test_packed_record_gives_one_conversation_per_sample():
    sample = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    convs = to_conversations([sample, {"messages": [{"role": "user", "content": "c"},
                                                    {"role": "assistant", "content": "d"}]}],
                             SPEC, 4)
    assert [c.messages[1]["content"][0]["text"] for c in convs] == ["b", "d"]
    assert convs[1].origin.endswith("record 4, sample 1")
    with pytest.raises(DataError, match="record 4, sample 1: no assistant turn"):
        to_conversations([sample, {"conversations": [{"from": "human", "value": "x"}]}], SPEC, 4)
    with pytest.raises(DataError, match="non-empty list"):
        to_conversations([], SPEC, 4)


# ----------------------------------------------------------------------------- media

@pytest.mark.parametrize("ref, data_path, expected", [
    ("a/b.jpg", "/imgs", "/imgs/a/b.jpg"),
    ("a/b.jpg", "s3://bucket/imgs/", "s3://bucket/imgs/a/b.jpg"),
    ("/abs/b.jpg", "/imgs", "/abs/b.jpg"),
    ("gs://b/c.jpg", "/imgs", "gs://b/c.jpg"),
    ("http://h/c.jpg", "/imgs", "http://h/c.jpg"),
    ("file:///x/c.jpg", "/imgs", "file:///x/c.jpg"),
])
def test_resolve_media(ref, data_path, expected):
    assert resolve_media(ref, data_path) == expected


def test_open_image_local_url_and_pil(tmp_path, make_image):
    path = make_image(tmp_path / "rgba.png", color=(0, 0, 255), mode="RGBA")
    for ref in (str(path), path, f"file://{path}"):
        img = open_image(ref)
        assert img.mode == "RGB" and img.size == (8, 6)
    fsspec = pytest.importorskip("fsspec")
    with fsspec.open("memory://imgs/x.png", "wb") as f:
        f.write(path.read_bytes())
    assert open_image("memory://imgs/x.png").size == (8, 6)
    gray = Image.new("L", (2, 2))
    assert open_image(gray).mode == "RGB"


def test_open_image_problems_name_the_file_and_fix(tmp_path):
    with pytest.raises(DataError,
                       match=r"record 3: image not found: .*nope.png\. Fix: .*data_path"):
        open_image(str(tmp_path / "nope.png"), origin="dataset 'demo', record 3")
    with pytest.raises(DataError, match="image not found"):
        open_image(f"file://{tmp_path}/nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*bad.png.*corrupt"):
        open_image(str(tmp_path / "bad.png"))
    with pytest.raises(DataError, match="expected a path"):
        open_image(42)
    with pytest.raises(DataError, match="is a folder, not an image file"):
        open_image(str(tmp_path))


def test_llava_dataset_end_to_end(llava_dataset):
    from qwenvl.data import load_dictionary
    spec = load_dictionary(llava_dataset["dictionary"])["a"]
    src = open_annotations(spec.annotation_path)
    conv = to_conversation(src[2], spec, 2)
    ref = conv.messages[0]["content"][0]["image"]
    assert ref == str(llava_dataset["images"] / "img0.png")
    assert open_image(ref).getpixel((0, 0)) == (255, 0, 0)
