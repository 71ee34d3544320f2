"""Stage 1 of a sample: which record, read and converted into a checked ``Conversation``.

- ``registry``: the dataset dictionary (``dataset_dictionary.json``) and ``--dataset_use``;
- ``mixture``: ``--dataset_use`` entries -> the seeded (dataset, record) list of one epoch;
- ``sources``: lazy random access to annotation files (JSONL, JSON arrays, saved HF datasets);
- ``formats``: raw records -> ``Conversation`` (where a record format is parsed);
- ``conversation_checks``: checks of a converted conversation shared by training, the
  length cache and the audit (``conversation_of``: read + convert + check one record);
- ``preflight``: a cheap look at the first records of every dataset before the model loads.
"""
