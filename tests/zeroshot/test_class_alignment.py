"""Class names are matched to the data's classes by name (then index, then position), never blindly by position:
a name list in another order than the folders used to score every image against the wrong name."""
import pytest
from PIL import Image

from classification import video
from classification.datasets import read_csv
from classification.zero_shot import (
    load_classnames,
    match_classes,
    resolve_class_index,
    resolve_classnames,
    run_zero_shot,
)
from tests.zeroshot.test_video import (
    DIGIT_WORDS,
    DigitOracle,
    digit_frame,
    digit_tokenizer,
    make_digit_videos,
    to_tensor,
)

KW = dict(tokenizer=digit_tokenizer, templates=["a photo of {c}."], num_workers=0, mode=None)


def oracle():
    m = DigitOracle()
    m.config = dict(image_size=64, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bicubic")
    return m


def digit_folders(root, digits=range(10), empty=()):
    for d in digits:
        (root / DIGIT_WORDS[d]).mkdir(parents=True, exist_ok=True)
        if d not in empty:
            Image.fromarray(digit_frame(d)).save(root / DIGIT_WORDS[d] / "a.png")
    return root


def test_names_in_another_order_than_the_folders(tmp_path):
    root = digit_folders(tmp_path / "img")
    assert run_zero_shot(oracle(), str(root), **KW)["acc1"] == 1.0
    # DIGIT_WORDS is in digit order; the folders sort alphabetically (eight, five, four, ...)
    assert run_zero_shot(oracle(), str(root), classnames=DIGIT_WORDS, **KW)["acc1"] == 1.0
    (tmp_path / "names.txt").write_text("\n".join(reversed(DIGIT_WORDS)) + "\n")
    assert run_zero_shot(oracle(), str(root), classnames=str(tmp_path / "names.txt"), **KW)["acc1"] == 1.0


def test_more_names_than_folders_and_an_empty_folder(tmp_path):
    root = digit_folders(tmp_path / "img", digits=[3, 7, 9], empty=[9])
    res = run_zero_shot(oracle(), str(root), classnames=DIGIT_WORDS, **KW)
    assert res["acc1"] == 1.0 and res["num_samples"] == 2


def test_csv_name_labels_with_a_shipped_key(tmp_path):
    names = load_classnames("en", "eurosat")
    (tmp_path / "e.csv").write_text("path,label\n" + "".join(f"x{i}.png,{n}\n" for i, n in enumerate(names)))
    samples, classes = read_csv(str(tmp_path / "e.csv"))
    cand, index = resolve_class_index("eurosat", classes)
    assert cand == names
    assert [cand[index[label]] for _, label in samples] == names  # every row keeps its own name
    # integer labels covering only some classes index into the shipped list
    (tmp_path / "i.csv").write_text("x.png,2\ny.png,7\n")
    samples, classes = read_csv(str(tmp_path / "i.csv"))
    cand, index = resolve_class_index("eurosat", classes)
    assert [cand[index[label]] for _, label in samples] == [names[2], names[7]]


def test_positional_convention_still_works():
    # EuroSAT's folders in sorted order pair with CLIP_benchmark's names by position; 'Forest' and 'River' also
    # match their names at the same position, which is consistent
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
               "Residential", "River", "SeaLake"]
    names = load_classnames("en", "eurosat")
    assert resolve_classnames("eurosat", folders) == names
    # numeric folders sort as strings ('10' before '2'): matched by index, not by position
    assert match_classes([f"c{i}" for i in range(11)], sorted(str(i) for i in range(11))) == \
        [int(c) for c in sorted(str(i) for i in range(11))]


@pytest.mark.parametrize("names,classes,msg", [
    (["b", "a", "c"], ["a", "b", "x"], r"class 'a' \(label 0\) is class name 1"),  # conflicting order
    (["a", "b"], ["a", "b", "x"], r"1 of them \('x'\) match no class name"),
    (["a", "a", "b"], ["a", "b"], "matches 2 class names"),
])
def test_conflicts_are_refused(names, classes, msg):
    with pytest.raises(ValueError, match=msg):
        match_classes(names, classes)


def test_wordnet_folders_with_an_imagenet_key():
    wnids = ["n01440764", "n01443537"]  # tench, goldfish: ImageNet-1k labels 0 and 1
    cand, index = resolve_class_index("imagenet1k", wnids[::-1])
    assert len(cand) == 1000 and index == [1, 0]
    with pytest.raises(ValueError, match="not among the 1000 WordNet ids"):
        resolve_class_index("imagenet1k", ["n99999999"])


def test_video_empty_class_folder_is_still_a_candidate(tmp_path):
    root = tmp_path / "v"
    make_digit_videos(root, lambda d, k: d, n_frames=2)
    (root / "nine" / "clip9.mkv").unlink()
    res = video.run_video_zero_shot(DigitOracle(), str(root), num_frames=2, templates=["{c}"],
                                    tokenizer=digit_tokenizer, transform=to_tensor, num_workers=0, mode=None)
    assert res["num_classes"] == 10 and res["acc1"] == 1.0
    names, labels = video._resolve_video_classnames(list(reversed(DIGIT_WORDS)), ["one", "nine"])
    assert labels == [8, 0]


def test_csv_format_details(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffpath,label\na.png,cat\n".encode())  # Excel's "CSV UTF-8"
    assert [c for _, c in read_csv(str(p))[0]] == [0] and read_csv(str(p))[1] == ["cat"]
    p = tmp_path / "comment.csv"
    p.write_text("# exported 2026-12-02\npath,label\na.png,cat\nb.png,dog\n")
    assert read_csv(str(p))[1] == ["cat", "dog"]
    p = tmp_path / "sup.csv"
    p.write_text("a.png,\u00b2\nb.png,x\n")  # '²'.isdigit() is True: a name, not an index
    assert read_csv(str(p))[1] == ["x", "\u00b2"]
    p = tmp_path / "huge.csv"
    p.write_text("a.png,0\nb.png,99999999999\n")
    with pytest.raises(ValueError, match=r"huge.csv:2: unknown label '99999999999' \(class indices above"):
        read_csv(str(p))
    p = tmp_path / "mixed.csv"  # the way out is named for the API and for the CLI (classes= alone is the API's)
    p.write_text("a.png,2\nb.png,purple\nc.png,1\n")
    with pytest.raises(ValueError, match=r"mixed.csv:2: unknown label 'purple' \(the other labels are class indices; "
                                         r"fix the class list with the dataset's classes=, zeroshot_eval's "
                                         r"--classnames, or classes.txt beside the CSV\)"):
        read_csv(str(p))
    p = tmp_path / "extra.csv"  # a third field without a header naming it: refused (a shifted row), not dropped
    p.write_text("a.png,red,extra\n")
    with pytest.raises(ValueError, match=r"extra.csv:1: expected 'path,label', got 3 fields 'a.png,red,extra' "
                                         r"\(quote a path holding a comma; more columns need a header row"):
        read_csv(str(p))
    p.write_text("path,label,split\na.png,red,val\nb.png,blue,\n")  # named by the header; trailing empties
    assert read_csv(str(p))[1] == ["blue", "red"]
    p.write_text("path,label\na.png,red,val\n")
    with pytest.raises(ValueError, match=r"extra.csv:2: expected 'path,label', got 3 fields"):
        read_csv(str(p))
    p = tmp_path / "latin1.csv"
    p.write_bytes("a.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.csv:1: not UTF-8 text"):
        read_csv(str(p))


@pytest.mark.parametrize("template,msg", [
    ("a {c} of {x}.", r"template 'a \{c\} of \{x\}.': unknown field \{x\}"),
    ("a {c} in {1}", r"template 'a \{c\} in \{1\}'"),
    ("a {c} and a {", r"template 'a \{c\} and a \{'"),
    ("no field", r"has no '\{c\}' placeholder"),
])
def test_bad_templates_are_named(template, msg):
    from classification.zero_shot import resolve_templates

    with pytest.raises(ValueError, match=msg):
        resolve_templates([template])
    assert resolve_templates(["a photo of a {c}.", "{}"]) == ["a photo of a {c}.", "{}"]


def test_duplicate_or_empty_names_of_your_own_are_refused():
    with pytest.raises(ValueError, match=r"duplicate class names: 'cat' \(position 0\) and 'Cat' \(position 2\)"):
        resolve_class_index(["cat", "dog", "Cat"], ["0", "1", "2"])
    with pytest.raises(ValueError, match="empty class name at position 1"):
        resolve_class_index(["cat", " "], ["0", "1"])
    with pytest.warns(UserWarning, match=r"2 names appear more than once \(4 classes: 'missile', 'sunglasses'\)"):
        resolve_class_index("imagenet1k", [str(i) for i in range(1000)])  # shipped quirks: warned, kept
