"""store.refuse_foreign_folder: the one check that a job's output folder is not a user's folder."""
import pytest

from internvit.store import refuse_foreign_folder


def test_refuses_only_a_non_empty_folder_without_the_markers(tmp_path):
    markers = ("manifest.json", ".store", "embeddings-add-*")
    refuse_foreign_folder(tmp_path / "missing", markers, "index")
    (tmp_path / "empty").mkdir()
    refuse_foreign_folder(tmp_path / "empty", markers, "index")
    user = tmp_path / "user"
    user.mkdir()
    for n in ("b.txt", "a.txt", "c.txt", "d.txt"):
        (user / n).write_text("mine")
    with pytest.raises(FileExistsError, match=r"user: a folder that is not empty \(a.txt, b.txt, c.txt, \.\.\.\) and "
                                              r"holds no index"):
        refuse_foreign_folder(user, markers, "index")
    (user / "embeddings-add-1a2b").mkdir()  # a pattern marker: an interrupted --add of ours
    refuse_foreign_folder(user, markers, "index")


def test_a_file_or_a_path_under_a_file_is_named(tmp_path):
    """An output "folder" that is a file (or lies under one) failed deep in the job with "[Errno 20] Not a
    directory: '.../embeddings'" (a path the user never gave): refused naming the file."""
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"afile: a file, not a folder: give a new or empty folder for the "
                                                 r"index"):
        refuse_foreign_folder(tmp_path / "afile", ("manifest.json",), "index")
    with pytest.raises(NotADirectoryError, match=rf"sub: {tmp_path / 'afile'}: a file, not a folder"):
        refuse_foreign_folder(tmp_path / "afile" / "deeper" / "sub", ("manifest.json",), "index")
    assert (tmp_path / "afile").read_text() == "mine"


def test_first_missing_dir_is_what_makedirs_would_create(tmp_path):
    from internvit.store import first_missing_dir

    assert first_missing_dir(tmp_path) is None
    assert first_missing_dir(tmp_path / "a" / "b" / "c") == str(tmp_path / "a")
    (tmp_path / "a").mkdir()
    assert first_missing_dir(tmp_path / "a" / "b" / "c") == str(tmp_path / "a" / "b")
