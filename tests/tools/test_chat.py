"""qwenvl.tools.chat: the prompt is the training rendering's prefix; generation; checkpoint kinds."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from qwenvl.data.catalog.formats import Conversation, to_conversation
from qwenvl.data.catalog.registry import DatasetSpec
from qwenvl.data.media.video import VideoSettings
from qwenvl.data.render.prompt import split_last_reply, user_conversation
from qwenvl.data.render.sample import IGNORE_INDEX, SampleRenderer, SpecialTokens
from qwenvl.tools import chat
from tests.conftest import FAMILIES, load_processor

DEMO_VIDEO = Path(__file__).parents[2] / "demo_data" / "videos" / "0000.mp4"


def _image(w, h, colour):
    return Image.new("RGB", (w, h), colour)


def _conversation(kind: str) -> Conversation:
    red, blue = _image(56, 56, (220, 30, 30)), _image(84, 56, (40, 70, 220))
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    if kind == "image":
        messages = [{"role": "user", "content": [{"type": "image", "image": red}, text("\nWhat colour is it?")]},
                    {"role": "assistant", "content": [text("red")]}]
    elif kind == "multi_image":  # two images, a system turn, two rounds: the prompt keeps the first reply
        messages = [{"role": "system", "content": [text("You compare pictures.")]},
                    {"role": "user", "content": [{"type": "image", "image": red}, text(" and "),
                                                 {"type": "image", "image": blue}, text(" differ?")]},
                    {"role": "assistant", "content": [text("yes")]},
                    {"role": "user", "content": [text("Which is wider?")]},
                    {"role": "assistant", "content": [text("the second")]}]
    elif kind == "video":
        messages = [{"role": "user", "content": [{"type": "video", "video": str(DEMO_VIDEO)},
                                                 text("\nWhich way does the square move?")]},
                    {"role": "assistant", "content": [text("right")]}]
    else:
        messages = [{"role": "user", "content": [text("What is 2 + 3?")]},
                    {"role": "assistant", "content": [text("5")]}]
    return Conversation(messages=messages, origin=f"test {kind}")


@functools.lru_cache(maxsize=None)
def _renderer(path) -> SampleRenderer:
    """The training renderer of a tiny checkpoint (cached: tests only read it)."""
    processor = load_processor(path)
    # Small frames and few of them: the test is about token layout, not resolution.
    video = VideoSettings.for_processor(processor, min_pixels=28 * 28, max_pixels=56 * 56, max_frames=4)
    return SampleRenderer(processor, AutoConfig.from_pretrained(path), video_settings=video)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("kind", ["image", "multi_image", "video", "text"])
def test_prompt_is_the_training_sample_up_to_the_assistant_header(tiny_model_dir, model_type, kind):
    renderer = _renderer(tiny_model_dir(model_type))
    conversation = _conversation(kind)
    sample = renderer.render(conversation)  # what training sees
    prompt, reference = split_last_reply(conversation)
    # What evaluate feeds generate(): the prompt of the mode the reply trains in (Qwen3.5: an answer
    # without reasoning trains in non-thinking mode, whose prompt holds the empty think block).
    mode = renderer.reply_thinking(conversation)
    inputs = renderer.encode(prompt, add_generation_prompt=True, thinking=mode)

    ids = inputs["input_ids"][0]
    n = ids.shape[0]
    assert torch.equal(ids, sample["input_ids"][:n])
    tokens = SpecialTokens.from_tokenizer(renderer.processor.tokenizer)
    header = renderer.processor.tokenizer(renderer.chat.rules.generation_prompt(mode),
                                          add_special_tokens=False)["input_ids"]
    # Ends with "<|im_start|>assistant\n" (Qwen3.5: then "<think>\n\n</think>\n\n").
    assert ids[-len(header):].tolist() == header
    assert header[:len(tokens.assistant_header)] == list(tokens.assistant_header)
    # What follows in the training sample is exactly the trained reply and its <|im_end|>.
    rest = sample["input_ids"][n:]
    trained = sample["labels"][n:] != IGNORE_INDEX
    reply = rest[trained].tolist()
    assert reply[-1] == tokens.im_end
    assert renderer.processor.tokenizer.decode(reply[:-1]) == reference
    # The same pixels, so the visual tokens mean the same thing.
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (key in inputs) == (key in sample)
        if key in sample:
            assert torch.equal(inputs[key], sample[key])


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_prompt_equals_the_processors_own_generation_prompt(tiny_model_dir, model_type):
    """For an inline-image conversation, the prompt is apply_chat_template(add_generation_prompt=True)."""
    renderer = _renderer(tiny_model_dir(model_type))
    prompt, _ = split_last_reply(_conversation("multi_image"))
    inline = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in prompt.messages]
    expected = renderer.processor.apply_chat_template(inline, tokenize=True, add_generation_prompt=True,
                                                      return_dict=True, return_tensors="pt")
    ours = renderer.encode(prompt, add_generation_prompt=True)
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])


def test_chat_cli_conversation_matches_a_llava_training_record(tiny_model_dir, tmp_path):
    """``--image a.png --prompt Q`` asks exactly what a record ``"<image>\\nQ"`` trains."""
    path = tiny_model_dir("qwen2_5_vl")
    _image(56, 84, (30, 160, 50)).save(tmp_path / "a.png")
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                                                   {"from": "gpt", "value": "green"}]}
    spec = DatasetSpec(name="t", annotation_path=str(tmp_path / "t.json"), data_path=str(tmp_path))
    renderer = _renderer(path)
    sample = renderer.render(to_conversation(record, spec, 0))
    asked = user_conversation("What colour is the shape?", [str(tmp_path / "a.png")])
    ids = renderer.encode(asked, add_generation_prompt=True)["input_ids"][0]
    assert torch.equal(ids, sample["input_ids"][:ids.shape[0]])
    # Explicit tags put the media where they stand; a count mismatch is an error, not a guess.
    tagged = user_conversation("Look: <image> now?", ["x.png"], system="Be brief.")
    assert [p["type"] for p in tagged.messages[1]["content"]] == ["text", "image", "text"]
    assert tagged.messages[0]["role"] == "system"
    from qwenvl.data.errors import DataError
    with pytest.raises(DataError, match="1 <image>"):
        user_conversation("<image> and?", ["a.png", "b.png"])


# ----------------------------------------------------------------------------- generation

QUESTION = "What colour is the shape?"


def _teach(model, processor, conversation, steps: int = 40, lr: float = 1e-2):
    """Overfit ``model`` on one rendered conversation (the test's stand-in for fine-tuning)."""
    renderer = SampleRenderer(processor, model.config)
    sample = renderer.render(conversation)
    batch = {"input_ids": sample["input_ids"][None], "labels": sample["labels"][None],
             "position_ids": sample["position_ids"][:, None], "pixel_values": sample["pixel_values"],
             "image_grid_thw": sample["image_grid_thw"]}
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


@pytest.fixture(scope="module")
def taught_model(tiny_model_dir, tmp_path_factory):
    """A tiny Qwen2.5-VL taught to answer "red<|im_end|>" to one image, saved like a training output."""
    from qwenvl.train.model import model_class_for

    path = tiny_model_dir("qwen2_5_vl")
    root = tmp_path_factory.mktemp("taught")
    image = root / "red.png"
    _image(56, 56, (220, 30, 30)).save(image)
    processor = load_processor(path)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    model = model_class_for("qwen2_5_vl").from_pretrained(path)
    conversation = user_conversation(QUESTION, [str(image)])
    conversation.messages.append({"role": "assistant", "content": [{"type": "text", "text": "red"}]})
    loss = _teach(model, processor, conversation)
    assert loss < 0.05, f"the tiny model did not learn the one sample (loss {loss})"
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, image


def test_generation_stops_at_im_end_and_returns_the_answer(taught_model):
    path, image = taught_model
    model, processor = chat.load_checkpoint(path, device="cpu")
    renderer = chat.make_renderer(model, processor, chat.chat_data_args(processor))
    reply = chat.generate(model, processor, renderer, user_conversation(QUESTION, [str(image)]), max_new_tokens=8)
    assert reply.text == "red"
    assert reply.stopped_at_end  # stopped by <|im_end|>, which is not part of the answer
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") not in reply.token_ids
    # With too small a budget the answer is cut, and says so.
    short = chat.generate(model, processor, renderer, user_conversation(QUESTION, [str(image)]), max_new_tokens=1)
    assert isinstance(short.text, str) and not short.stopped_at_end and len(short.token_ids) == 1


def test_chat_cli_prints_the_answer(taught_model, capsys):
    path, image = taught_model
    answer = chat.main(["--model", str(path), "--image", str(image), "--prompt", QUESTION,
                        "--max_new_tokens", "8", "--device", "cpu"])
    assert answer == "red"
    assert capsys.readouterr().out.strip().splitlines()[-1] == "red"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generation_with_images_and_a_video_on_every_family(tiny_model_dir, tmp_path, model_type):
    """An untrained model answers (some string) a two-image + video prompt, and a text-only one."""
    _image(56, 56, (220, 30, 30)).save(tmp_path / "a.png")
    _image(84, 56, (40, 70, 220)).save(tmp_path / "b.png")
    model, processor = chat.load_checkpoint(tiny_model_dir(model_type), device="cpu")
    settings = chat.chat_data_args(processor, max_pixels=56 * 56, video_max_pixels=56 * 56,
                                   video_min_pixels=28 * 28, video_max_frames=4)
    renderer = chat.make_renderer(model, processor, settings)
    asked = user_conversation("Describe both pictures and the clip.", [tmp_path / "a.png", tmp_path / "b.png"],
                              [str(DEMO_VIDEO)])
    reply = chat.generate(model, processor, renderer, asked, max_new_tokens=3)
    assert isinstance(reply.text, str) and 1 <= len(reply.token_ids) <= 3
    reply = chat.generate(model, processor, renderer, user_conversation("Hello?", system="Be brief."),
                          max_new_tokens=2)
    assert isinstance(reply.text, str) and 1 <= len(reply.token_ids) <= 2


def test_data_settings_come_from_the_saved_processor_and_flags_override(taught_model):
    path, _ = taught_model
    processor = load_processor(path)
    assert chat.chat_data_args(processor).max_pixels == 56 * 56
    assert chat.chat_data_args(processor).min_pixels == 56 * 56
    assert chat.chat_data_args(processor, max_pixels=112 * 112).max_pixels == 112 * 112
    # One bound given past the saved other one moves it along instead of failing.
    lowered = chat.chat_data_args(processor, max_pixels=28 * 28)
    assert (lowered.min_pixels, lowered.max_pixels) == (28 * 28, 28 * 28)
    raised = chat.chat_data_args(processor, min_pixels=112 * 112)
    assert (raised.min_pixels, raised.max_pixels) == (112 * 112, 112 * 112)


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])  # per-frame / whole-video size
def test_video_settings_are_read_back_from_a_training_output(tiny_model_dir, tmp_path, model_type):
    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.render.processor_settings import configure_processor

    trained = DataArguments(video_fps=3.0, video_min_frames=2, video_max_frames=6, video_min_pixels=28 * 28,
                            video_max_pixels=56 * 56)
    out = tmp_path / "run"
    configure_processor(load_processor(tiny_model_dir(model_type)), trained).save_pretrained(out)
    assert not chat.written_by_training(out)
    (out / "run_args.json").write_text("{}")  # what train_qwen writes into its output_dir
    assert chat.written_by_training(out) and chat.written_by_training(out / "checkpoint-5")
    read = chat.chat_data_args(load_processor(out), video_from_processor=True)
    assert (read.video_fps, read.video_min_frames, read.video_max_frames) == (3.0, 2, 6)
    assert (read.video_min_pixels, read.video_max_pixels) == (28 * 28, 56 * 56)
    # A released processor: its video size is not a per-frame bound, so the flag defaults apply.
    released = chat.chat_data_args(load_processor(tiny_model_dir(model_type)),
                                   video_from_processor=False)
    assert released.video_max_pixels == DataArguments().video_max_pixels


# ----------------------------------------------------------------------------- LoRA checkpoints

def _lora_checkpoint(base: Path, out: Path) -> torch.Tensor:
    """Save a peft LoRA adapter (non-zero, so it changes the output) on ``base``; return its logits."""
    from peft import LoraConfig, get_peft_model

    from qwenvl.train.model import lora_target_pattern, model_class_for

    model = model_class_for("qwen2_5_vl").from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_pattern(["q_proj", "v_proj"]),
                        modules_to_save=["model.visual.merger"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; a trained adapter is not
    peft_model.save_pretrained(out)
    load_processor(base).save_pretrained(out)
    peft_model.eval()
    with torch.no_grad():
        return peft_model(input_ids=_probe_ids(base)).logits


def _probe_ids(path) -> torch.Tensor:
    return load_processor(path).tokenizer("What colour is the shape?", return_tensors="pt")["input_ids"]


def test_lora_adapter_loads_with_its_base(tiny_model_dir, tmp_path):
    base = tiny_model_dir("qwen2_5_vl")
    adapter = tmp_path / "adapter"
    expected = _lora_checkpoint(base, adapter)
    assert chat.is_adapter_dir(adapter) and not chat.is_adapter_dir(base)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    model, processor = chat.load_checkpoint(adapter, device="cpu")  # base from the adapter config
    with torch.no_grad():
        logits = model(input_ids=_probe_ids(base)).logits
        plain = chat.load_checkpoint(base, device="cpu")[0](input_ids=_probe_ids(base)).logits
    assert torch.allclose(logits, expected, atol=1e-4)
    assert not torch.allclose(logits, plain, atol=1e-2)  # the adapter is really applied
    assert not hasattr(model, "peft_config")  # merged: a plain transformers model

    # --base overrides the adapter config's base (e.g. the base moved).
    moved = tmp_path / "moved_base"
    moved.symlink_to(base, target_is_directory=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(chat.CheckpointError, match="pass --base"):
        chat.load_checkpoint(adapter, device="cpu")
    model, _ = chat.load_checkpoint(adapter, base=moved, device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=_probe_ids(base)).logits, expected, atol=1e-4)


def test_load_checkpoint_says_what_is_wrong(tmp_path):
    with pytest.raises(chat.CheckpointError, match="no such directory"):
        chat.load_checkpoint(tmp_path / "missing")
    with pytest.raises(chat.CheckpointError, match="neither config.json"):
        chat.load_checkpoint(tmp_path)
    with pytest.raises(SystemExit):  # the command line prints the message and exits
        chat.main(["--model", str(tmp_path), "--prompt", "hi"])
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(chat.CheckpointError, match="names no base model"):
        chat.load_checkpoint(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_5"])
def test_lora_output_of_a_training_run_loads_and_answers(tiny_model_dir, tmp_path, model_type):
    """train(--lora_enable True) -> chat loads the adapter folder with its base, as merge_lora would."""
    from transformers import AutoModelForImageTextToText

    from qwenvl.tools.merge_lora import merge_lora
    from qwenvl.train.train_qwen import train

    base = tiny_model_dir(model_type)
    _image(56, 56, (220, 30, 30)).save(tmp_path / "red.png")
    records = [{"image": "red.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                      {"from": "gpt", "value": "red"}]}] * 4
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "dictionary.json").write_text(json.dumps({"d": {"annotation_path": "data.json", "data_path": "."}}))
    out = train(["--model_name_or_path", str(base), "--dataset_use", "d", "--dataset_dictionary",
                 str(tmp_path / "dictionary.json"), "--output_dir", str(tmp_path / "run"), "--lora_enable", "True",
                 "--lora_r", "4", "--lora_alpha", "8", "--tune_mm_llm", "True", "--tune_mm_mlp", "True",
                 "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
                 "--max_pixels", str(56 * 56), "--min_pixels", str(56 * 56), "--save_strategy", "no",
                 "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "True"])
    assert chat.is_adapter_dir(out) and chat.written_by_training(out)

    model, processor = chat.load_checkpoint(out, device="cpu")
    merged = AutoModelForImageTextToText.from_pretrained(merge_lora(out, tmp_path / "merged")).eval()
    ids = _probe_ids(base)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert processor.image_processor.size["longest_edge"] == 56 * 56  # the run's settings came along
    answer = chat.main(["--model", str(out), "--image", str(tmp_path / "red.png"), "--prompt", QUESTION,
                        "--max_new_tokens", "3", "--device", "cpu"])
    assert isinstance(answer, str)
