"""A user's text file saved with a UTF-8 byte-order mark (Windows Notepad / Excel "UTF-8") reads as the same
entries as without one, in every reader of user-written text: image list files, class-name files, caption
sidecars (folders and webdataset tars), few-shot subset files and JSON (trial 7b: the mark stayed in the first
entry, so a class name stopped matching its folder and a prompt changed)."""
import io
import json
import os
import tarfile

from PIL import Image

BOM = "\ufeff"


def _write(path, text: str, bom: bool) -> str:
    with open(path, "wb") as f:
        f.write(((BOM if bom else "") + text).encode())
    return str(path)


def _image(path) -> str:
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return str(path)


def test_image_list_file(tmp_path):
    from internvit.data import list_images

    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png")
    for bom in (False, True):
        assert list_images(_write(tmp_path / f"l{bom}.txt", "a.png\nb.png\n", bom)) == [a, b]


def test_class_names_file_of_a_probe_dataset(tmp_path):
    from classification.datasets import _read_classes

    for bom in (False, True):
        assert _read_classes(_write(tmp_path / f"c{bom}.txt", "cat\ndog\n", bom)) == ["cat", "dog"]


def test_caption_sidecars_and_tar_members(tmp_path):
    from retrieval.inputs import image_inputs

    os.makedirs(tmp_path / "imgs")
    _image(tmp_path / "imgs" / "a.png")
    _write(tmp_path / "imgs" / "a.txt", "a red square\n", True)
    assert image_inputs(str(tmp_path / "imgs"))[1] == ["a red square"]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (("k.png", buf.getvalue()), ("k.txt", (BOM + "a black square").encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert image_inputs(str(tmp_path / "s.tar"))[1] == ["a black square"]


def test_json_read_by_the_tools(tmp_path):
    from internvit.cli import read_json

    assert read_json(_write(tmp_path / "x.json", json.dumps(["a", "b"]), True)) == ["a", "b"]


def test_few_shot_subset_file(tmp_path):
    """``subset_file`` of the few-shot datasets: the listed files, the first one included."""
    import segmentation  # noqa: F401, I001 - first: applies internvit.compat (mmcv-lite shims) before mmseg
    from mmseg.datasets import BaseSegDataset
    from segmentation.few_shot import FewShotMixin

    class Subset(FewShotMixin, BaseSegDataset):
        METAINFO = dict(classes=("a", "b"), palette=[[0, 0, 0], [1, 1, 1]])

    os.makedirs(tmp_path / "img")
    os.makedirs(tmp_path / "ann")
    for n in ("x", "y", "z"):
        _image(tmp_path / "img" / f"{n}.png")
        Image.new("L", (8, 8)).save(tmp_path / "ann" / f"{n}.png")
    listed = _write(tmp_path / "subset.txt", "x.png\nz.png\n", True)
    ds = Subset(data_root=str(tmp_path), data_prefix=dict(img_path="img", seg_map_path="ann"), img_suffix=".png",
                seg_map_suffix=".png", subset_file=listed, pipeline=[])
    assert sorted(os.path.basename(d["img_path"]) for d in ds.load_data_list()) == ["x.png", "z.png"]
