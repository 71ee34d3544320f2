"""Stage 3 of a sample: rendered samples -> batches, and the lengths that plan them.

- ``collate``: the collators (padded, or flattened/packed with per-sample positions);
- ``count``: exact token counts without decoding pixels (the renderer's fit rule on counted sizes);
- ``length_cache``: the per-file cache of those counts (format, load, build) and a run's per-item
  lengths; ``length_key``: everything that changes a count, hashed into the cache's key;
  ``parallel_map``: the forked map that builds it (and the audit uses);
- ``length_check``: training's check of each rendered sample against its cached row;
- ``packing``: bin packing under a token budget and an optional vision-patch budget;
- ``sampler``: batch samplers over the length cache (online packing, length grouping);
- ``budget``: a token budget sized to hold a given number of samples on average.
"""
