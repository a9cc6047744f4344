"""The three CLIs: build → search (table, JSON, HTML) → evaluate; bad input gives one line and exit 2."""
import json
import os

import numpy as np
import pytest

from .helpers import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def call(argv):
        try:
            return mod.run(mod.main, argv)
        except SystemExit as e:  # argparse errors
            return e.code

    return call


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_images(str(root / "imgs"), 8)
    rc = _main("build_index")([str(root / "imgs"), str(root / "idx"), "--model", "internvit:internvit-6b-tiny",
                               "--quiet"])
    assert rc == 0
    return root


def test_build_search_html(built, capsys):
    q = str(built / "imgs" / "img_002.png")
    assert _main("search")([str(built / "idx"), "--image", q, "-k", "3", "--html", str(built / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "img_002.png" in out.splitlines()[2]  # rank 1 is the query image itself
    page = (built / "r.html").read_text()
    assert page.count(f"<img src='{(built / 'imgs').as_uri()}/img_") == 4  # the query + 3 hits, file:// URIs
    assert _main("search")([str(built / "idx"), "--image", q, "-k", "2", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in recs] == [1, 2] and recs[0]["path"] == q


def test_search_html_never_replaces_a_file_without_overwrite(built, capsys):
    """--html onto an existing file (here: another image of the folder, or the query itself) is refused with one
    line and the file is untouched; --overwrite replaces it."""
    q, other = str(built / "imgs" / "img_002.png"), str(built / "imgs" / "img_001.png")
    for target in (other, q):
        before = open(target, "rb").read()
        assert _main("search")([str(built / "idx"), "--image", q, "-k", "2", "--html", target]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --html {target}: already exists (pass --overwrite to replace it)"]
        assert open(target, "rb").read() == before
    page = str(built / "page.html")
    open(page, "w").write("mine")
    assert _main("search")([str(built / "idx"), "--image", q, "-k", "2", "--html", page, "--overwrite"]) == 0
    assert "<img" in open(page).read()


def test_rebuild_from_embeddings_folder_without_model(built, capsys):
    assert _main("build_index")([str(built / "idx" / "embeddings"), str(built / "idx2"), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ntotal"] == 8 and info["index_key"] == "Flat"


@pytest.mark.parametrize("args, message", [
    (["search", "{root}/nope", "--text", "x"], "nope: index folder does not exist"),
    (["search", "{root}/idx", "--text", " "], "argument --text: empty value ' '"),
    (["search", "{root}/idx", "--image", "{root}/missing.jpg"], "missing.jpg: no such image file"),
    (["search", "{root}/idx", "--text", "a dog"], "image-only"),
    (["search", "{root}/idx", "--image", "{root}/imgs/img_000.png", "--model", "internvit:internvit-300m-tiny"],
     "built with encoder"),
    (["build_index", "{root}/nothing", "{root}/x", "--model", "internvit:internvit-6b-tiny"], "nothing"),
    (["build_index", "{root}/imgs", "{root}/x"], "without --model"),
    (["build_index", "{root}/imgs", "{root}/y", "--model", "internvit:no-such-preset"], "no-such-preset"),
    (["eval_retrieval", "index", "{root}/nope"], "does not exist"),
])
def test_bad_input_one_line_and_exit_2(built, capsys, args, message):
    tool, *rest = [a.format(root=built) for a in args]
    assert _main(tool)(rest) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_eval_recall_exact_and_through_index(tmp_path, capsys, internvl_fixture):
    paths = make_images(str(tmp_path / "imgs"), 6)
    ann = [{"image": os.path.relpath(p, tmp_path), "caption": [f"Image {i}.", f"A picture ({i})"]}
           for i, p in enumerate(paths)]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.warns(UserWarning, match=r"^recall: image_retrieval_recall@10 not reported \(k >= the gallery: "
                                         r"6 images, 12 captions"):  # printed as a 'warning: ' line
        rc = _main("eval_retrieval")(["recall", "--model", f"internvl-g:{internvl_fixture}", "--annotations",
                                      str(tmp_path / "ann.json"), "--out", str(tmp_path / "res.json")])
    assert rc == 0
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n_images"] == 6 and res["n_texts"] == 12
    assert res["index_keys"]["image"]["index_key"] == "Flat"  # tiny sets: exact index, so both agree
    assert res["index"] == res["exact"]
    for v in res["exact"].values():
        assert 0.0 <= v <= 1.0
    # only 6 images: every text hits within 10, a number that says nothing: left out, with a warning
    assert "image_retrieval_recall@10" not in res["exact"] and "text_retrieval_recall@10" in res["exact"]
    out = json.loads(capsys.readouterr().out)
    assert out == res
    np.testing.assert_equal(sorted(res["exact"]), sorted(res["index"]))
