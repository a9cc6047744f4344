"""internvit.compat: mmcv-lite shim and the safe loader behind mmengine's checkpoint loading."""
import os

import numpy as np
import pytest
import torch

from internvit import compat


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _runner_like_checkpoint(path):
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub.get_instance("internvit-test-compat")
    hub.update_scalar("train/loss", 0.5)
    torch.save({"meta": {"iter": 3, "seed": np.int64(7), "lr": np.float64(0.1)},
                "state_dict": {"w": torch.ones(2)}, "message_hub": hub.state_dict(),
                "history": HistoryBuffer([1.0, 2.0], [1, 1])}, path)


def test_runner_checkpoint_loads_through_mmengine(tmp_path):
    compat.apply(mmseg=False)
    from mmengine.logging import HistoryBuffer
    from mmengine.runner import CheckpointLoader

    path = str(tmp_path / "iter_3.pth")
    _runner_like_checkpoint(path)
    with compat.safe_checkpoint_loading():
        ckpt = CheckpointLoader.load_checkpoint(path, map_location="cpu")
    assert ckpt["meta"]["seed"] == 7 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    history = ckpt["history"]
    assert type(history) is HistoryBuffer and history.mean() == 1.5 and history.current() == 2.0
    loss = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert type(loss) is HistoryBuffer and loss.current() == 0.5


def test_safe_loader_only_inside_the_block():
    compat.apply(mmseg=False)
    from mmengine.runner import CheckpointLoader

    before = CheckpointLoader._get_checkpoint_loader("x.pth")
    with compat.safe_checkpoint_loading():
        assert CheckpointLoader._get_checkpoint_loader("x.pth") is compat._load_local
        assert CheckpointLoader._get_checkpoint_loader("https://example.org/x.pth") is compat._load_url
    assert CheckpointLoader._get_checkpoint_loader("x.pth") is before is not compat._load_local


def test_arbitrary_pickles_refused(tmp_path):
    compat.apply(mmseg=False)
    from mmengine.runner import CheckpointLoader

    from internvit import CheckpointError

    path = str(tmp_path / "evil.pth")
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refusing to load: it references posix.system"):
        with compat.safe_checkpoint_loading():
            CheckpointLoader.load_checkpoint(path, map_location="cpu")


def test_mmseg_imports_with_the_shim():
    compat.apply(mmseg=True)
    import mmcv.ops
    import mmseg.models  # noqa: F401  (fails on mmcv-lite without the shim)

    assert callable(mmcv.ops.point_sample)
