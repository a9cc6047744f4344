"""Trial 8b, retrieval fine-tuning: recall@k of a gallery no larger than k is left out of the report and of
mean_recall (F9); bad ImageTextPairs arguments are set-up errors (F10); --resume of a checkpoint whose optimizer
state has other parameter groups (another recipe) is one error line naming it (F11); a dataset tokenizer that is
not the model's (the one hf_model ships) is refused at set-up (F12)."""
import os
import warnings

import numpy as np
import pytest
import torch

from retrieval.finetune.demo_data import all_captions, make_digit_pairs, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs", "retrieval", "toy", "digits_internvl_tiny.py")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> str:
    """The toy retrieval config on a small digits set (2 scans a digit), no data-loader workers."""
    tmp = tmp_path_factory.mktemp("trial8b_ret")
    data = tmp / "digits"
    make_digit_pairs(str(data), per_class=2)
    path = tmp / "cfg.py"
    path.write_text(f"_base_ = [{BASE!r}]\ndata_root = {str(data)!r}\ntokenizer = data_root + '/tokenizer.model'\n"
                    "model = dict(tokenizer=tokenizer, config='internvl-tiny')\n"
                    "train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict("
                    "annotation=data_root + '/train.json', tokenizer=tokenizer, image_size=28))\n"
                    "val_dataloader = dict(dataset=dict(annotation=data_root + '/val_10.json', tokenizer=tokenizer, "
                    "image_size=28))\ntest_dataloader = val_dataloader\n", encoding="utf-8")
    return str(path)


def _train_fails(argv: list, capsys) -> str:
    from internvit.cli import UsageError, run
    from tests.core.test_runner_errors import _tool

    capsys.readouterr()
    rc = run(_tool("train").main, argv, user_errors=(UsageError,))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    return lines[0]


def test_recall_at_k_of_a_gallery_no_larger_than_k_is_not_reported_nor_averaged():
    """F9: 3 images, 6 captions, ks=(1, 2, 5): text -> image recall@5 (a 3-image gallery) was 1.0 for any model
    and averaged into mean_recall."""
    from retrieval.evaluate import retrieval_recall
    from retrieval.finetune.engine import RetrievalRecall

    rng = np.random.default_rng(0)
    image = torch.tensor(rng.standard_normal((3, 8)), dtype=torch.float32)
    text = torch.tensor(rng.standard_normal((6, 8)), dtype=torch.float32)
    metric = RetrievalRecall(ks=(1, 2, 5))
    results = [dict(index=i, text=text[2 * i:2 * i + 2], image={"InternVL-C": image[i]}) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = metric.compute_metrics(results)
    assert "C/image_retrieval_recall@5" not in out
    assert {"C/image_retrieval_recall@1", "C/image_retrieval_recall@2", "C/text_retrieval_recall@5"} <= set(out)
    full = retrieval_recall(image.numpy(), text.numpy(), np.repeat(np.arange(3), 2), (1, 2, 5))
    kept = [v for k, v in full.items() if k not in ("mean_recall", "image_retrieval_recall@5")]
    assert out["C/mean_recall"] == pytest.approx(np.mean(kept))
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("image_retrieval_recall@5 not reported" in m and "3 images" in m for m in msgs), msgs


def test_recall_with_every_k_trivial_reports_no_mean():
    from retrieval.finetune.engine import RetrievalRecall

    results = [dict(index=0, text=torch.ones(1, 4), image={"InternVL-G": torch.ones(4)})]
    with pytest.warns(UserWarning, match="not reported"):
        assert RetrievalRecall(ks=(1, 5)).compute_metrics(results) == {}


@pytest.mark.parametrize("option,must", [
    ("train_dataloader.dataset.scale=[0.9,0.2]", "scale=[0.9, 0.2] must be an increasing pair"),
    ("train_dataloader.dataset.scale=[0,1]", "scale=[0, 1] must be an increasing pair"),
    ("train_dataloader.dataset.hflip=2.0", "hflip=2.0 is not a probability"),
    ("train_dataloader.dataset.image_size=30", "train_dataloader.dataset: image_size=30 is not a multiple of the "
                                               "model's patch size 14"),
    ("val_dataloader.dataset.image_size=0", "image_size=0 is not a positive integer"),
])
def test_bad_image_text_pairs_arguments_are_setup_errors(option, must, cfg, tmp_path, capsys):
    """F10: a reversed scale and an image size off the patch grid failed at the first batch (traceback, rc 1);
    hflip=2.0 was accepted. Now one error line at set-up, and the work dir is not created."""
    work = tmp_path / "work"
    line = _train_fails([cfg, "--work-dir", str(work), "--cfg-options", option], capsys)
    assert must in line, line
    assert not work.exists()


def test_a_dataset_tokenizer_other_than_the_models_is_refused(cfg, tmp_path, capsys):
    """F12: model.tokenizer overridden (as docs/finetune.md says) but not the datasets': the run trained on one
    tokenizer and shipped the other in hf_model."""
    other = tmp_path / "other"
    other.mkdir()
    train_tokenizer(str(other / "tokenizer.model"), all_captions(), vocab_size=80)
    work = tmp_path / "work"
    line = _train_fails([cfg, "--work-dir", str(work), "--cfg-options", f"model.tokenizer={other}"], capsys)
    assert "train_dataloader.dataset.tokenizer (" in line and f"is not model.tokenizer ({other}" in line, line
    assert "hf_model" in line and not work.exists()


def test_a_dataset_tokenizer_that_is_a_copy_of_the_models_is_accepted(cfg, tmp_path):
    import shutil

    from internvit.runner import build_train_runner

    copy = tmp_path / "copy"
    copy.mkdir()
    data_root = os.path.join(os.path.dirname(cfg), "digits")
    shutil.copy(os.path.join(data_root, "tokenizer.model"), copy / "tokenizer.model")
    build_train_runner(cfg, work_dir=str(tmp_path / "work"), cfg_options={"model.tokenizer": str(copy)})


def test_resume_with_other_parameter_groups_is_one_line_naming_the_checkpoint(cfg, tmp_path, capsys):
    """F11: --resume of a full-recipe checkpoint with model.recipe=head: a 30-line traceback from runner.train
    ('loaded state dict has a different number of parameter groups'); now refused at set-up."""
    from internvit.runner import build_train_runner

    runner = build_train_runner(cfg, work_dir=str(tmp_path / "first"))
    ckpt = tmp_path / "epoch_1.pth"
    torch.save({"meta": {"epoch": 1, "iter": 2}, "state_dict": runner.model.state_dict(),
                "optimizer": runner.optim_wrapper.state_dict()}, ckpt)
    work = tmp_path / "work"
    line = _train_fails([cfg, "--work-dir", str(work), "--resume", str(ckpt), "--cfg-options", "model.recipe=head"],
                        capsys)
    assert line.startswith(f"error: --resume {ckpt}: its optimizer state has ") and "this config's optimizer 1" in line
    assert f"load_from={ckpt}" in line, line
    assert not work.exists()
