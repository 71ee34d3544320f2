"""Videos that decode but are not what the record means: a still image named .mp4 is an error (it
decoded as a one-frame video), a clip with fewer frames than --video_min_frames is a warning that
training logs and the audit reports."""
from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from qwenvl.data.batch.count import probe_video
from qwenvl.data.errors import DataError, DataKind
from qwenvl.data.media.video import VideoSettings, load_video
from qwenvl.tools import audit
from tests.video.conftest import make_video


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_still_image_named_mp4_is_refused(tmp_path, fmt):
    path = tmp_path / "clip.mp4"
    Image.new("RGB", (64, 48), (10, 200, 10)).save(path, format=fmt)
    for read in (lambda: load_video(path, origin="dataset 'v', record 2"),
                 lambda: probe_video(str(path), VideoSettings(), "dataset 'v', record 2")):
        with pytest.raises(DataError, match=rf"still {fmt} image, not a video") as err:
            read()
        assert err.value.kind is DataKind.BAD_VIDEO and "record 2" in str(err.value)


def test_a_clip_shorter_than_min_frames_is_a_warning_in_training_and_the_audit(tmp_path, caplog, capsys):
    root = tmp_path / "short"
    root.mkdir()
    frames = make_video(root / "blink.mp4", seconds=0.3, fps=10)  # 3 frames
    assert frames < 4
    with caplog.at_level(logging.WARNING):
        clip = load_video(root / "blink.mp4", VideoSettings(min_frames=4, max_frames=8))
    assert clip.total_frames == frames
    assert "fewer than --video_min_frames 4" in caplog.text and "blink.mp4" in caplog.text

    make_video(root / "long.mp4", seconds=3, fps=10)
    records = [{"video": name, "conversations": [{"from": "human", "value": "<video>\nWhat moves?"},
                                                 {"from": "gpt", "value": "a bar"}]}
               for name in ("long.mp4", "blink.mp4")]
    (root / "a.json").write_text(json.dumps(records))
    (root / "dict.json").write_text(json.dumps({"v": {"annotation_path": "a.json", "data_path": "."}}))
    report_path = tmp_path / "r.json"
    status = audit.main(["--dataset_use", "v", "--dataset_dictionary", str(root / "dict.json"), "--num_workers",
                         "1", "--video_min_frames", "4", "--report", str(report_path)])
    report = json.loads(report_path.read_text())
    assert status == 0 and report["bad"] == 0  # a warning, not a problem
    assert [(w["record"], w["kind"]) for w in report["warnings"]] == [(1, "few_frames")]
    assert "[few_frames] v record 1" in capsys.readouterr().out
