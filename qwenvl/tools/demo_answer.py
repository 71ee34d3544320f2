"""Ask one held-out question before and after fine-tuning: the last lines of the demo.

    python -m qwenvl.tools.demo_answer --before .cache/tiny-qwen2_5_vl --after demo_output \\
        [--dataset demo_shapes_eval] [--index 0] [--dataset_dictionary dataset_dictionary.json]

Takes record ``--index`` of ``--dataset`` (a held-out split the run did not train on),
asks its last question with its image(s) to both checkpoints, greedily, with the prompt
built as training renders it (``qwenvl.tools.chat``) and the image settings the run
saved in ``--after``'s processor (so the two models see the same pixels), and prints::

    held-out question (demo_shapes_eval, record 0): What colour is the shape?
    image: demo_data/images/shapes_eval/0000.png
    reference answer:         green
    before fine-tuning:       '...'
    after fine-tuning:        'green'  (right)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


@dataclass
class DemoAnswer:
    question: str
    media: list[str]
    reference: str
    before: str
    after: str

    @property
    def right(self) -> bool:
        """The fine-tuned answer equals the reference (case and surrounding space aside)."""
        return self.after.strip().lower() == self.reference.strip().lower()


def _held_out(dictionary_path: str, dataset: str, index: int):
    from qwenvl.data.catalog.formats import to_conversation
    from qwenvl.data.catalog.registry import load_dictionary
    from qwenvl.data.catalog.sources import open_annotations
    from qwenvl.data.render.prompt import reply_text, split_last_reply

    dictionary = load_dictionary(dictionary_path)
    if dataset not in dictionary:
        raise SystemExit(f"error: no dataset {dataset!r} in {dictionary_path}")
    spec = dictionary[dataset]
    conversation = to_conversation(open_annotations(spec.annotation_path)[index], spec, index)
    prompt, reference = split_last_reply(conversation)
    question = reply_text(prompt.messages[-1])
    media = [str(part.get(part["type"])) for m in prompt.messages for part in m["content"]
             if part["type"] in ("image", "video")]
    return prompt, question.strip(), media, reference


def ask(before: str, after: str, dataset: str = "demo_shapes_eval", index: int = 0,
        dataset_dictionary: str = "dataset_dictionary.json", max_new_tokens: int = 32) -> DemoAnswer:
    """The held-out record's question asked to the ``before`` and ``after`` checkpoints."""
    from qwenvl.tools.chat import chat_data_args, generate, load_checkpoint, make_renderer, written_by_training

    prompt, question, media, reference = _held_out(dataset_dictionary, dataset, index)
    replies = {}
    settings = None
    for name, path in (("after", after), ("before", before)):
        model, processor = load_checkpoint(path, device="cpu")
        if settings is None:  # the run's saved settings, used for both models
            settings = chat_data_args(processor, written_by_training(path))
        renderer = make_renderer(model, processor, settings)
        replies[name] = generate(model, processor, renderer, prompt, max_new_tokens).text
    return DemoAnswer(question, media, reference, replies["before"], replies["after"])


def main(argv: list[str] | None = None) -> DemoAnswer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the checkpoint before fine-tuning")
    parser.add_argument("--after", required=True, help="the fine-tuned checkpoint (its processor's settings are used)")
    parser.add_argument("--dataset", default="demo_shapes_eval", help="held-out dataset of the dictionary")
    parser.add_argument("--index", type=int, default=0, help="record of that dataset")
    parser.add_argument("--dataset_dictionary", default="dataset_dictionary.json")
    args = parser.parse_args(argv)
    answer = ask(args.before, args.after, args.dataset, args.index, args.dataset_dictionary)
    print(f"held-out question ({args.dataset}, record {args.index}): {answer.question}")
    for ref in answer.media:
        print(f"image: {ref}")
    print(f"reference answer:         {answer.reference}")
    print(f"before fine-tuning:       {answer.before!r}")
    print(f"after fine-tuning:        {answer.after!r}  ({'right' if answer.right else 'wrong'})", flush=True)
    return answer


if __name__ == "__main__":
    main(sys.argv[1:])
