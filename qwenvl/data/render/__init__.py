"""Stage 2 of a sample: a checked ``Conversation`` -> the tensors the model trains on.

- ``chat_pieces``: the conversation as chat-template pieces, each marked trained or not
  (labels are built here, while rendering, with a rule per family for injected text);
- ``piece_tokens``: pieces -> token ids and trained flags; ``prompt``: messages in the
  processor's chat-template form (tags, tools, the one place text becomes a prompt);
- ``sample``: ``SampleRenderer``, one conversation -> ``input_ids``, ``labels``, pixels,
  grid sizes and positions;
- ``fit``: the fit-to-context rule (shrink media to ``model_max_length`` or drop), shared
  with the counter of ``qwenvl.data.batch.count``;
- ``rope``: mRoPE positions by the model's own ``get_rope_index``;
  ``processor_settings``: the pixel and frame flags applied to the processor;
- ``grounding`` / ``grounding_check``: boxes and points rewritten into the family's
  coordinates, and what the audit reports about them.

``IGNORE_INDEX`` is defined here (not in a submodule) so the training side can import the
label value without importing the renderer.
"""

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips: tokens that are not trained
