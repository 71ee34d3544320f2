"""Apply the pixel and frame flags to a processor, so checkpoints carry them.

The processor is saved with every checkpoint; writing the training settings into
it (instead of keeping them only in the dataset) means inference resizes images
exactly as training did.
"""
from __future__ import annotations


def whole_video_pixel_budget(video_processor) -> bool:
    """True where the video processor's ``size`` bounds the whole video (Qwen3-VL) rather than a frame."""
    return type(video_processor).__name__.startswith("Qwen3VL")


def configure_processor(processor, data_args):
    """Write ``--max_pixels/--min_pixels`` and the ``--video_*`` flags into ``processor``; returns it.

    Images: ``size = {shortest_edge: min_pixels, longest_edge: max_pixels}``, the
    bounds every family's image processor resizes into.  Videos: the per-video pixel
    bounds and the frame sampling settings (fps, min/max frames), which the video
    processor keeps so inference samples frames the way training did.
    """
    image = processor.image_processor
    image.size = {"shortest_edge": int(data_args.min_pixels), "longest_edge": int(data_args.max_pixels)}
    # Older configs also carry the bounds as attributes; keep them in step when present.
    for name, value in (("min_pixels", data_args.min_pixels), ("max_pixels", data_args.max_pixels)):
        if hasattr(image, name):
            setattr(image, name, int(value))
    video = getattr(processor, "video_processor", None)
    if video is not None:
        if whole_video_pixel_budget(video):
            # Qwen3-VL's video processor bounds frames x height x width, not one frame: store
            # the budget that gives every frame --video_max_pixels at --video_max_frames.
            video.size = {"shortest_edge": int(data_args.video_min_pixels) * int(data_args.video_min_frames),
                          "longest_edge": int(data_args.video_max_pixels) * int(data_args.video_max_frames)}
        else:
            video.size = {"shortest_edge": int(data_args.video_min_pixels),
                          "longest_edge": int(data_args.video_max_pixels)}
        video.fps = float(data_args.video_fps)
        video.min_frames = int(data_args.video_min_frames)
        video.max_frames = int(data_args.video_max_frames)
    return processor
