"""save_model replaces a folder only when asked and only when it holds nothing but a saved model (a user's
files in it were deleted without a flag); convert_checkpoint follows the same rule."""
import os

import pytest
import torch

import internvit
from internvit.factory import convert_checkpoint


@pytest.fixture(scope="module")
def model():
    return internvit.build_model("internvit-6b-tiny", seed=0)


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files)


def test_a_folder_of_other_files_is_never_deleted(tmp_path, model):
    user = tmp_path / "mydocs"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    (user / "sub" / "thesis.tex").write_text("x")
    before = _tree(user)
    with pytest.raises(FileExistsError, match="not empty .*overwrite=True"):
        internvit.save_model(model, user)
    with pytest.raises(FileExistsError, match=r"holds entries that saving a model does not write \(notes.txt, sub\)"):
        internvit.save_model(model, user, overwrite=True)
    assert _tree(user) == before and (user / "notes.txt").read_text() == "precious"
    # a saved model with one file of the user's beside it: refused as well, the model kept
    saved = internvit.save_model(model, tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"README\.md"):
        internvit.save_model(model, saved, overwrite=True)
    assert (tmp_path / "m" / "README.md").read_text() == "my notes"


def test_a_saved_model_is_replaced_with_overwrite_only(tmp_path, model):
    folder = internvit.save_model(model, tmp_path / "m", max_shard_bytes=20_000)  # sharded
    assert any(n.startswith("model-00001-of-") for n in os.listdir(folder))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        internvit.save_model(model, folder)
    other = internvit.build_model("internvit-6b-tiny", seed=1)
    internvit.save_model(other, folder, overwrite=True)  # the sharded files are what saving writes: replaced
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    loaded = internvit.load_model(folder)
    for k, v in other.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    (tmp_path / "empty").mkdir()
    internvit.save_model(model, tmp_path / "empty")  # an empty folder needs no flag


def test_convert_checkpoint_refuses_an_existing_destination(tmp_path, model):
    src = internvit.save_model(model, tmp_path / "hf")
    dst = tmp_path / "o.pth"
    dst.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_checkpoint(src, dst, to="original")
    assert dst.read_bytes() == b"mine"
    convert_checkpoint(src, dst, to="original", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_checkpoint(str(dst), src, to="hf")


def test_a_symbolic_link_is_refused(tmp_path, model):
    """The swap replaced the link with a real folder (the folder it pointed to untouched) and left a temporary
    link behind."""
    real = internvit.save_model(model, tmp_path / "real")
    os.symlink(real, tmp_path / "link")
    for path in (tmp_path / "link", str(tmp_path / "link") + "/"):
        with pytest.raises(FileExistsError, match="a symbolic link"):
            internvit.save_model(model, path, overwrite=True)
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(tmp_path)) == ["link", "real"]
