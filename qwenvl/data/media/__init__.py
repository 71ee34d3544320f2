"""Images and video: resolve, read under a time limit, decode, sample, size.

- ``read``: media references resolved against a dataset's data_path, URLs, images opened
  and checked (aspect ratio, header-only sizes for counting);
- ``time_limit``: the time limit around every media read;
- ``video``: frame sampling, timing and sizing, and the video inputs handed to the
  processors (``VideoSettings`` and ``video_settings_from`` the flags);
- ``video_decode``: the decoding backends (torchcodec, decord, PyAV, frame folders);
- ``video_checks``: videos that decode but are not what the record means.
"""
