"""Configs and checkpoints that cannot be used are refused when they are loaded, naming the file and field: a zero
image_std or a one-value image_mean failed only when a transform was built, another model family's config
(model_type 'llama') loaded as an InternViT, and a non-square position grid said "pass old_hw" (an internal
argument) as a plain ValueError without the file or key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import internvit
from internvit.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "model"
    internvit.save_model(internvit.build_model("internvit-6b-tiny"), str(folder))
    return folder


@pytest.mark.parametrize("field,value,must", [
    ("image_std", [0, 0, 0], "config: image_std must be 3 finite numbers > 0, got [0, 0, 0]"),
    ("image_std", [0.2, float("nan"), 0.2], "config: image_std must be 3 finite numbers > 0"),
    ("image_mean", [0.5], "config: image_mean must be 3 finite numbers, got [0.5]"),
    ("model_type", "llama", "config: model_type 'llama' is not one this package reads (intern_vit_6b, internvl, "
                            "internvl_chat)"),
])
def test_unusable_config_fields_are_refused_at_load(saved, tmp_path, field, value, must):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        internvit.load_model(str(folder))
    assert str(e.value).startswith(f"{folder}/config.json: ") and must in str(e.value)


@pytest.mark.parametrize("shape", [(1, 11, 64), (1, 17, 32), (2, 17, 64)])
def test_a_position_grid_that_cannot_be_resized_names_the_file_and_key(saved, tmp_path, shape):
    """Not square (11 rows), another width (loaded without a word, then a size error at the first forward
    naming neither file nor key), or a batch of tables."""
    folder = tmp_path / "pos"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder)
    state = dict(internvit.load_model(str(saved)).state_dict())
    state["embeddings.position_embedding"] = torch.randn(*shape)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        internvit.load_model(str(folder))
    assert str(e.value) == (f"{folder}: embeddings.position_embedding: {list(shape)} in the checkpoint is not a "
                            f"square grid of patch rows plus a class row of the model's width, so it cannot be "
                            f"resized to the model's [1, 17, 64]")
