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


def test_make_dirs_counts_only_the_folders_it_made(tmp_path, monkeypatch):
    """A folder another process creates between the look and the mkdir is not this call's to remove: a refused
    job (Store.__exit__, a training set-up) would otherwise delete the other process's output folder."""
    import os

    from internvit.store import Store, make_dirs

    assert make_dirs(tmp_path) is None
    assert make_dirs(tmp_path / "a" / "b" / "c") == str(tmp_path / "a") and (tmp_path / "a" / "b" / "c").is_dir()
    real_mkdir = os.mkdir
    theirs = str(tmp_path / "x")

    def racing_mkdir(path, *args, **kwargs):
        if os.fspath(path) == theirs:  # the other process wins the race for this level
            real_mkdir(path)
            (tmp_path / "x" / "their_file").write_text("theirs")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    assert make_dirs(tmp_path / "x" / "y") == str(tmp_path / "x" / "y")
    # a store block refused before writing removes what it made (x/z/.store, x/z), never x (theirs)
    with pytest.raises(RuntimeError):
        with Store(tmp_path / "x" / "z"):
            raise RuntimeError("refused")
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert not (tmp_path / "x" / "z").exists() and (tmp_path / "x" / "their_file").read_text() == "theirs"
