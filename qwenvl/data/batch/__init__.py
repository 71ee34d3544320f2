"""Stage 3 of a sample: rendered samples -> batches, and the lengths that plan them.

- ``collate``: the collators (padded, or flattened/packed with per-sample positions);
- ``lengths``: exact token counts without decoding pixels, and the per-file length cache;
- ``packing``: bin packing under a token budget and an optional vision-patch budget;
- ``sampler``: batch samplers over the length cache (online packing, length grouping);
- ``budget``: a token budget sized to hold a given number of samples on average.
"""
