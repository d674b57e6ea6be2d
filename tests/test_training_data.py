"""Synthetic dataset: determinism per seed, caption/label consistency, rank slicing, video folders."""

import numpy as np
import pytest
import torch

from s2dit_deploy.reference_training.data import (ATTRIBUTES, DIGIT_WORDS, NOUNS, SyntheticVideoDataset, caption,
                                                  global_batch)


def test_same_seed_same_clip_other_seed_differs():
    a, b, c = SyntheticVideoDataset(32, 64, 1, seed=5), SyntheticVideoDataset(32, 64, 1, seed=5), SyntheticVideoDataset(32, 64, 1, seed=6)
    for i in (0, 3):
        x, y = a[i], b[i]
        assert torch.equal(x["video"], y["video"]) and x["caption"] == y["caption"] and x["labels"] == y["labels"]
    assert not all(torch.equal(a[i]["video"], c[i]["video"]) for i in range(3))
    v = a[0]["video"]
    assert v.shape == (3, 12, 32, 64) and v.min() >= -1 and v.max() <= 1


def test_caption_names_the_labelled_attributes():
    ds = SyntheticVideoDataset(32, 64, 1, seed=0, caption_drop=0.0)
    rng = np.random.default_rng(0)
    for i in range(40):
        p = ds.params(np.random.default_rng([0, i]))
        text = caption(p)  # full caption: every attribute named
        words = text.split()
        labels = p.labels()
        assert ATTRIBUTES["color"][labels["color"]] in words
        assert ATTRIBUTES["direction"][labels["direction"]] in words
        assert ATTRIBUTES["motion"][labels["motion"]] in words
        assert ATTRIBUTES["background"][labels["background"]] in words
        shape = ATTRIBUTES["shape"][labels["shape"]]
        if shape == "digit":
            assert "digit" in words and str(p.digit) in words
        else:
            assert NOUNS[shape][0] in words
        assert p.color != p.background  # the object is always visible
        varied = caption(p, rng, drop=0.5).split()  # optional words may go, the core never changes
        assert p.color in varied and p.motion in varied and p.background in varied
        if shape == "digit":
            assert str(p.digit) in varied or DIGIT_WORDS[p.digit] in varied


def test_object_is_drawn_in_its_colour():
    ds = SyntheticVideoDataset(64, 96, 1, seed=1)
    for i in range(6):
        item = ds[i]
        if item["params"].background in ("temple", "flower"):
            continue
        from s2dit_deploy.reference_training.data import BACKGROUNDS, COLORS

        frames = ((item["video"] + 1) * 127.5).permute(1, 2, 3, 0).reshape(-1, 3)
        color = torch.tensor(COLORS[item["params"].color], dtype=torch.float32)
        bg = torch.tensor(BACKGROUNDS[item["params"].background], dtype=torch.float32)
        near_color = ((frames - color).abs().max(dim=1).values < 2).float().mean()
        near_bg = ((frames - bg).abs().max(dim=1).values < 2).float().mean()
        assert near_color > 0.002 and near_bg > 0.5


def test_rank_slices_make_the_global_batch():
    ds = SyntheticVideoDataset(32, 64, 1, seed=2)
    full = global_batch(ds, 3, 4)
    parts = [global_batch(ds, 3, 4, rank=r, world=2) for r in range(2)]
    assert torch.equal(full["video"], torch.cat([p["video"] for p in parts]))
    assert full["caption"] == parts[0]["caption"] + parts[1]["caption"]
    with pytest.raises(ValueError, match="divisible"):
        global_batch(ds, 0, 3, rank=0, world=2)


def test_video_folder_dataset(tmp_path):
    av = pytest.importorskip("av")
    from s2dit_deploy.reference_training.data import VideoFolderDataset

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        for i in range(26):
            img = np.zeros((32, 64, 3), np.uint8)
            img[:, : 2 * i] = 200
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    with pytest.raises(ValueError, match="no caption"):
        VideoFolderDataset(tmp_path, 32, 64, chunks=1)
    (tmp_path / "clip.txt").write_text("a white bar growing\n")
    ds = VideoFolderDataset(tmp_path, 32, 64, chunks=1)
    assert len(ds) == 2  # 26 frames -> two 12-frame clips
    item = ds[1]
    assert item["caption"] == "a white bar growing" and item["video"].shape == (3, 12, 32, 64)
