"""A fine-tuning run whose hf_model output folder is a user's: refused at set-up with one error line (it was a
traceback from the hook's before_train, after the runner had written its logs)."""
import os

from retrieval.finetune.demo_data import make_digit_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "internvl-tiny"


def test_a_user_folder_at_hf_model_is_a_setup_error(tmp_path, capsys):
    from internvit.cli import UsageError, run
    from tests.core.test_runner_errors import _tool

    data = tmp_path / "digits"
    make_digit_pairs(str(data), per_class=2)
    cfg = tmp_path / "cfg.py"
    base = os.path.join(ROOT, "configs", "retrieval", "toy", "digits_internvl_tiny.py")
    cfg.write_text(f"_base_ = [{base!r}]\ndata_root = {str(data)!r}\ntokenizer = data_root + '/tokenizer.model'\n"
                   f"model = dict(tokenizer=tokenizer, config={TINY!r})\n"
                   "train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict("
                   "annotation=data_root + '/train.json', tokenizer=tokenizer, image_size=28))\n"
                   "val_dataloader = dict(dataset=dict(annotation=data_root + '/val_10.json', tokenizer=tokenizer, "
                   "image_size=28))\ntest_dataloader = val_dataloader\n", encoding="utf-8")
    work = tmp_path / "work"
    (work / "hf_model").mkdir(parents=True)
    (work / "hf_model" / "notes.txt").write_text("mine")
    capsys.readouterr()
    rc = run(_tool("train").main, [str(cfg), "--work-dir", str(work)], user_errors=(UsageError,))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "hf_model exists and was not written by a fine-tuning run" in lines[0], lines
    assert sorted(os.listdir(work)) == ["hf_model"] and (work / "hf_model" / "notes.txt").read_text() == "mine"
