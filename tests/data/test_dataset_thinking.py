"""Per-dataset thinking mode: ``enable_thinking`` in the dataset dictionary overrides ``--enable_thinking``
for that dataset's records (Qwen3.5/3.6), in training, lengths, preview and the audit."""
from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from qwenvl.data.arguments import DataArguments
from qwenvl.data.dataset import make_supervised_data_module
from qwenvl.data.errors import DataError
from qwenvl.data.batch.length_cache import TokenCounter
from qwenvl.data.preview import preview
from qwenvl.data.catalog.registry import load_dictionary
from tests.conftest import load_processor

# The same two records in every dataset: an answer without reasoning, and one with.
PLAIN = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "plain answer"}]}
REASONED = {"messages": [{"role": "user", "content": "b?"},
                         {"role": "assistant", "content": "reasoned answer", "reasoning_content": "because"}]}


def _dictionary(tmp_path, **modes) -> str:
    """One dataset per keyword (value: its enable_thinking, or None for none), each holding PLAIN and REASONED."""
    dictionary = {}
    for name, mode in modes.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([PLAIN, REASONED]))
        dictionary[name] = {"annotation_path": str(path)}
        if mode is not None:
            dictionary[name]["enable_thinking"] = mode
    (tmp_path / "dict.json").write_text(json.dumps(dictionary))
    return str(tmp_path / "dict.json")


def test_dictionary_accepts_true_false_auto_and_names_the_dataset_otherwise(tmp_path):
    specs = load_dictionary(_dictionary(tmp_path, on=True, off=False, auto="auto", text="false", unset=None))
    assert [specs[n].enable_thinking for n in ("on", "off", "auto", "text", "unset")] == \
        ["true", "false", "auto", "false", None]
    path = _dictionary(tmp_path, yes="yes", one=1, fine=True)
    with pytest.raises(DataError) as info:
        load_dictionary(path)
    msg = str(info.value)
    assert "2 problems" in msg  # collected with the other fields' problems, all at once
    assert "dataset 'yes': 'enable_thinking' must be true, false or \"auto\", got 'yes'" in msg
    assert "dataset 'one': 'enable_thinking' must be true, false or \"auto\", got 1" in msg
    assert "'fine'" not in msg


def _trained(sample, tokenizer) -> str:
    return tokenizer.decode(sample["labels"][sample["labels"] != -100])


@pytest.mark.parametrize("flag", ["auto", "true"])
def test_two_datasets_of_one_mixture_train_in_their_own_modes(tiny_model_dir, tmp_path, flag):
    """thinking=true trains even the plain answer's (empty) think block; thinking=false drops the reasoning and
    trains no think block; a dataset without the key follows --enable_thinking."""
    path = tiny_model_dir("qwen3_5")
    processor, config = load_processor(path), AutoConfig.from_pretrained(path)
    args = DataArguments(dataset_use="think,nothink,follow", enable_thinking=flag,
                         dataset_dictionary=_dictionary(tmp_path, think=True, nothink=False, follow=None))
    dataset = make_supervised_data_module(processor, args, config)["train_dataset"]
    counter = TokenCounter.for_renderer(dataset.renderer)
    tok = processor.tokenizer
    trained = {}
    for i in range(len(dataset)):
        d, r = (int(x) for x in dataset.mixture[i])
        sample = dataset[i]
        trained[dataset.entries[d].spec.name, r] = _trained(sample, tok)
        # The length cache counts each record in its dataset's mode.
        assert counter(dataset.conversations(i)).tokens == sample["input_ids"].shape[0]
    assert trained["think", 0] == "\n</think>\n\nplain answer<|im_end|>"  # thinking mode: closes the empty block
    assert trained["think", 1] == "because\n</think>\n\nreasoned answer<|im_end|>"
    assert trained["nothink", 0] == trained["nothink", 1].replace("reasoned", "plain") == "plain answer<|im_end|>"
    assert "because" not in trained["nothink", 1]
    follow = {"auto": ("plain answer<|im_end|>", "because\n</think>\n\nreasoned answer<|im_end|>"),
              "true": ("\n</think>\n\nplain answer<|im_end|>", "because\n</think>\n\nreasoned answer<|im_end|>")}[flag]
    assert (trained["follow", 0], trained["follow", 1]) == follow


def test_preview_and_audit_show_the_dataset_mode(tiny_model_dir, tmp_path):
    from qwenvl.tools.audit import AuditArguments, format_report, run_audit

    path = str(tiny_model_dir("qwen3_5"))
    dictionary = _dictionary(tmp_path, nothink=False, follow=None)
    text = preview(["--dataset_use", "nothink", "--dataset_dictionary", dictionary, "--model_name_or_path", path,
                    "--index", "1"])
    assert "enable_thinking false (dataset 'nothink' in the dictionary; --enable_thinking auto for the others)" in text
    assert "mode: non-thinking" in text and "because" not in text
    followed = preview(["--dataset_use", "follow", "--dataset_dictionary", dictionary, "--model_name_or_path", path,
                        "--index", "1"])
    assert "--enable_thinking auto" in followed and "mode: thinking" in followed

    report, status = run_audit(DataArguments(dataset_use="nothink,follow", dataset_dictionary=dictionary),
                               AuditArguments(model_name_or_path=path, num_workers=0, report=str(tmp_path / "a.json")),
                               progress=False)
    assert status == 0
    assert report["datasets"]["nothink"]["enable_thinking"] == {"mode": "false", "from": "dataset_dictionary"}
    assert report["datasets"]["follow"]["enable_thinking"] == {"mode": "auto", "from": "--enable_thinking"}
    # The reasoning dropped in non-thinking mode: fewer tokens than the same records read in auto mode.
    assert report["datasets"]["nothink"]["tokens"]["max"] < report["datasets"]["follow"]["tokens"]["max"]
    assert ("thinking mode (Qwen3.5/3.6): nothink: false (dataset_dictionary); follow: auto (--enable_thinking)"
            in format_report(report))


def test_a_record_keeps_its_dataset_mode_through_pack_data(tmp_path):
    """pack_data writes the dataset's enable_thinking into each packed record (a packed file mixes datasets);
    a record's own key wins over its dataset's, as bbox_format does."""
    from types import SimpleNamespace

    import numpy as np

    from qwenvl.data.catalog.formats import to_conversation, to_conversations
    from qwenvl.data.catalog.registry import parse_dataset_use
    from qwenvl.data.catalog.sources import open_annotations
    from qwenvl.tools.pack_data import write_packs

    dictionary = load_dictionary(_dictionary(tmp_path, nothink=False, follow=None))
    entries = parse_dataset_use("nothink,follow", dictionary)
    sources = [open_annotations(e.spec.annotation_path) for e in entries]
    plan = {"entries": entries, "sources": sources, "mixture": np.array([[0, 0], [1, 1]]),
            "result": SimpleNamespace(packs=[[0, 1]])}
    write_packs(plan, str(tmp_path / "packed.json"))
    pack = json.loads((tmp_path / "packed.json").read_text())[0]
    assert pack[0]["enable_thinking"] == "false" and "enable_thinking" not in pack[1]
    conversations = to_conversations(pack, dictionary["follow"], 0)
    assert [c.thinking for c in conversations] == ["false", None]
    assert to_conversation({**PLAIN, "enable_thinking": True}, dictionary["nothink"], 0).thinking == "true"
    with pytest.raises(DataError, match="'enable_thinking' must be true, false or \"auto\", got 'on'"):
        to_conversation({**PLAIN, "enable_thinking": "on"}, dictionary["follow"], 3)
