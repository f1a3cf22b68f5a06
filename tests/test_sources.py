"""Frame sources: folders and videos are lossless and ordered; cameras keep only the newest frame."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from streamrecon.sources import CameraSource, ImageFolderSource, SourceError, VideoSource, open_source


def test_folder_is_sorted_naturally_and_strided(tmp_path):
    from PIL import Image

    for i in (1, 2, 10, 11):
        Image.fromarray(np.full((20, 30, 3), i, np.uint8)).save(tmp_path / f"frame{i}.png")
    src = ImageFolderSource(tmp_path, fps=10)
    frames = list(src)
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 10, 11]
    assert [f.seq for f in frames] == [0, 1, 2, 3] and frames[3].stamp == pytest.approx(0.3)
    assert [int(f.image[0, 0, 0]) for f in ImageFolderSource(tmp_path, stride=2)] == [1, 10]
    rep = list(ImageFolderSource(tmp_path, fps=10, repeat=2))
    assert len(rep) == 8 and all(b.stamp > a.stamp for a, b in zip(rep, rep[1:]))


def test_rgbd_folders_read_the_colour_images_only(shared, tmp_path):
    """A raw SUN3D / 7-Scenes folder (``frame-N.color.png`` beside ``frame-N.depth.png``): the depth maps
    are not frames; a folder of depth maps only says so."""
    d = shared / "data" / "sun3d_studyroom" / "fragment-1-rgbd-frames"
    src = ImageFolderSource(d)
    assert len(src.paths) == 50 and all(p.name.endswith(".color.png") for p in src.paths)
    assert src.expected_frames() == 50
    for p in sorted(d.glob("*.depth.png"))[:2]:
        (tmp_path / p.name).symlink_to(p)
    with pytest.raises(SourceError, match="only 2 depth maps"):
        ImageFolderSource(tmp_path)


def test_corrupt_image_is_counted_and_skipped(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), i, np.uint8)).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "001.png").write_bytes(b"garbage")
    src = ImageFolderSource(tmp_path)
    frames = list(src)
    assert [f.seq for f in frames] == [0, 2]
    assert src.stats.errors == 1 and "001.png" in src.stats.last_error


def test_euroc_names_are_nanosecond_timestamps(shared):
    folder = shared / "data" / "euroc_V1_01_easy_cam0_f000-094" / "mav0" / "cam0" / "data"
    src = ImageFolderSource(folder)
    first = next(iter(src))
    assert first.stamp == pytest.approx(1403715273.262142976, abs=1e-6)
    assert first.image.shape == (480, 752, 3)  # greyscale stacked to RGB
    assert len(src) == 95


def test_video_is_decoded_sequentially(shared):
    path = shared / "data" / "cut3r_examples" / "lady-running.mp4"
    src = VideoSource(path)
    frames = list(src)
    assert len(frames) == 65 == len(src)
    assert [f.seq for f in frames] == list(range(65))
    stamps = [f.stamp for f in frames]
    assert all(b > a for a, b in zip(stamps, stamps[1:])) and stamps[1] == pytest.approx(1 / 30, abs=2e-3)
    assert frames[0].image.shape == (480, 854, 3)
    assert len(list(VideoSource(path, stride=4))) == 17


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "nope.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(SourceError, match="cannot decode video"):
        open_source(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="cannot open camera"):
        open_source("cam:/dev/video97")
    with pytest.raises(SourceError, match="streamrecon serve"):
        open_source("tcp://127.0.0.1:5555")


class FakeCapture:
    """Produces ``n`` frames, one every ``period`` s; the frame value encodes its index."""

    def __init__(self, n: int, period: float) -> None:
        self.n, self.period, self.i = n, period, 0

    def isOpened(self):
        return True

    def read(self):
        time.sleep(self.period)
        if self.i >= self.n:
            return False, None
        img = np.full((8, 8, 3), self.i % 256, np.uint8)
        self.i += 1
        return True, img

    def get(self, prop):
        return 0.0

    def set(self, prop, value):
        return True

    def release(self):
        pass


def test_camera_keeps_only_the_newest_frame():
    src = CameraSource(0, max_failures=3, open_capture=lambda dev: FakeCapture(n=60, period=0.002))
    got = []
    for f in src:
        got.append(f)
        time.sleep(0.02)  # a slow consumer
    seqs = [f.seq for f in got]
    assert all(b > a for a, b in zip(seqs, seqs[1:])) and seqs[-1] == 59  # newest always wins, last one delivered
    assert src.stats.dropped > 20
    assert src.stats.read == len(got) + src.stats.dropped == 60
    assert sum(b - a - 1 for a, b in zip(seqs, seqs[1:])) + seqs[0] == src.stats.dropped  # drops == seq gaps
    src.close()


def test_camera_grabs_nothing_until_the_node_asks_for_frames():
    """`live:` replays and cameras start when the node is ready, not while the model loads."""
    cap = FakeCapture(n=5, period=0.001)
    src = CameraSource(0, max_failures=3, open_capture=lambda dev: cap)
    time.sleep(0.1)  # the node loading its model
    assert cap.i == 0 and src.stats.read == 0
    got = list(src)
    assert cap.i == 5 and src.stats.read == 5 and got[-1].seq == 4
    src.close()


def test_camera_closed_before_any_frame_ends_at_once():
    cap = FakeCapture(n=5, period=0.001)
    src = CameraSource(0, open_capture=lambda dev: cap)
    src.close()
    assert list(src) == [] and cap.i == 0


def test_video_replayed_as_a_camera(shared, tmp_path):
    path = tmp_path / "clip.mp4"
    shutil.copy(shared / "data" / "cut3r_examples" / "lady-running.mp4", path)
    src = open_source(f"live:{path}")
    assert src.live
    t0 = time.monotonic()
    frames = list(src)
    assert time.monotonic() - t0 > 1.5  # paced at 30 fps: 65 frames take ~2 s
    assert 0 < len(frames) <= 65 and src.stats.read == 65
