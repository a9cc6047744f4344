"""Shared set-up of the classification probe tests: the toy digits set and toy-config loading."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIGS = os.path.join(ROOT, "configs", "classification", "toy")


@pytest.fixture(scope="session")
def toy_digits(tmp_path_factory) -> str:
    from classification.datasets import make_toy_digits

    out = str(tmp_path_factory.mktemp("cls") / "toy_digits")
    make_toy_digits(out)
    return out


def toy_config(name: str, data_root: str, work_dir: str, **overrides):
    """A toy config with its data under ``data_root`` and its work dir / feature caches under ``work_dir``."""
    from mmengine.config import Config

    from internvit import compat

    compat.apply(mmseg=False)
    cfg = Config.fromfile(os.path.join(TOY_CONFIGS, name))
    # No yapf formatting of the config text (logged and stored in checkpoints): with long tmp paths it takes
    # seconds per call. mmengine 0.10.7's fromfile ignores its format_python_code argument, hence the setattr.
    object.__setattr__(cfg, "_format_python_code", False)
    cfg.work_dir = work_dir
    cfg.log_level = "WARNING"
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = cfg[key]["dataset"]
        if ds["type"] == "CachedFeatureDataset":
            ds["dataset"]["data_root"] = data_root
            ds["cache_dir"] = os.path.join(work_dir, "cache", ds["feature"], ds["dataset"]["split"])
        else:
            ds["data_root"] = data_root
    cfg.merge_from_dict(overrides)
    return cfg
