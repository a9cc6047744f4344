"""Retrieval fine-tuning of InternVL-C/G (retrieval.finetune): losses, gathering across processes, recipes,
data formats, schedule, a real mmengine run that raises recall, and the HF save/load round trip."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.finetune import InternVLRetrievalFinetune, load_pairs, multi_positive_contrastive
from retrieval.finetune.demo_data import make_digit_pairs

TINY = dict(
    vision_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                       image_size=28, patch_size=14, initializer_factor=1.0),
    qllama_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_query_token=4, vision_hidden_size=32),
    clip_embed_dim=16, attn_pool_num_heads=2, num_query_token=4)


def tiny_model(**kw) -> InternVLRetrievalFinetune:
    return InternVLRetrievalFinetune(pretrained="internvl-tiny", config=TINY, **kw)


def fake_batch(n: int, seed: int = 0, ids=None) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 28, 28, generator=g)
    samples = {"image_id": torch.as_tensor(ids if ids is not None else list(range(n)))}
    for name in ("text", "match", "neg"):
        lengths = torch.randint(3, 9, (n,), generator=g)
        ids_ = torch.randint(3, 128, (n, 10), generator=g)
        mask = torch.arange(10)[None] < lengths[:, None]
        ids_[:, 0] = 1
        ids_[torch.arange(n), lengths - 1] = 2
        samples[f"{name}_ids"], samples[f"{name}_mask"] = ids_ * mask, mask
    return x, samples


# -- the loss -----------------------------------------------------------------------------------------------
def test_contrastive_loss_matches_hand_computation_with_multiple_positives():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.1, 1.0]]), dim=-1)
    ids = torch.tensor([7, 7, 3])  # rows 0 and 1 are two captions of the same image
    scale = torch.tensor(2.0)
    got = multi_positive_contrastive(img, txt, img, txt, ids, ids, scale)

    def direction(a, b):
        total = 0.0
        for i in range(3):
            logits = [float(scale) * float(a[i] @ b[j]) for j in range(3)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(3) if ids[j] == ids[i]]
            total += -sum((logits[j] - log_z) / len(pos) for j in pos)
        return total / 3

    want = (direction(img, txt) + direction(txt, img)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)
    # one positive per row is plain CLIP cross-entropy
    single = multi_positive_contrastive(img, txt, img, txt, torch.arange(3), torch.arange(3), scale)
    logits = scale * img @ txt.t()
    clip = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3))) / 2
    assert single.item() == pytest.approx(clip.item(), rel=1e-6)


def _worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model()
        x, s = fake_batch(8, ids=[0, 0, 1, 2, 2, 3, 4, 0])
        half = slice(rank * 4, rank * 4 + 4)
        losses = model(x[half], {k: v[half] for k, v in s.items()}, mode="loss")
        loss = sum(v for k, v in losses.items() if k.startswith("loss"))
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():  # what DDP does: average the gradients over processes
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[n] = g / world
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"loss": total / world, "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_gathered_loss_and_gradients_equal_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "dist.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    dist_res = torch.load(out)
    model = tiny_model()
    x, s = fake_batch(8, ids=[0, 0, 1, 2, 2, 3, 4, 0])
    losses = model(x, s, mode="loss")
    loss = sum(v for k, v in losses.items() if k.startswith("loss"))
    loss.backward()
    assert dist_res["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(dist_res["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


# -- recipes ------------------------------------------------------------------------------------------------
def test_recipe_trainable_split():
    full = tiny_model(recipe="full")
    assert all(p.requires_grad for p in full.parameters())
    head = tiny_model(recipe="head")
    assert head.trainable_parameter_names() == ["model.text_projection"]
    head.train()
    assert not head.model.vision_model.training and not head.model.qllama.training  # frozen towers: eval mode
    x, s = fake_batch(4)
    losses = head(x, s, mode="loss")
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert head.model.text_projection.grad is not None and head.model.text_projection.grad.abs().sum() > 0
    cross = tiny_model(recipe=dict(freeze_model=True, unfreeze_crossattn=True))
    names = cross.trainable_parameter_names()
    assert names and all("cross_attn" in n for n in names)
    with pytest.raises(ValueError, match="recipe must be one of"):
        tiny_model(recipe="lora")


def test_warmup_decay_schedule_matches_deepspeed_formula():
    from mmengine.optim import OptimWrapper

    from retrieval.finetune import WarmupDecayLR

    p = torch.nn.Parameter(torch.zeros(1))
    opt = OptimWrapper(torch.optim.AdamW([p], lr=1e-6))
    s = WarmupDecayLR(opt, warmup=100, begin=0, end=1000, by_epoch=False)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        s.step()
    assert lrs[0] == 0.0
    assert lrs[9] == pytest.approx(1e-6 * math.log(10) / math.log(100))
    assert lrs[100] == pytest.approx(1e-6)
    assert lrs[550] == pytest.approx(1e-6 * 450 / 900)
    assert lrs[999] == pytest.approx(1e-6 / 900)


# -- data ---------------------------------------------------------------------------------------------------
def test_annotation_formats(tmp_path):
    (tmp_path / "f.txt").write_text("image,caption\n1000.jpg,A Dog (running)!  on  grass.\n"
                                    "1000.jpg,second caption\n2000.jpg,other: image~\n", encoding="utf-8")
    pairs = load_pairs(str(tmp_path / "f.txt"), str(tmp_path / "Images"))
    assert pairs == [(str(tmp_path / "Images" / "1000.jpg"), "a dog running on grass", 0),
                     (str(tmp_path / "Images" / "1000.jpg"), "second caption", 0),
                     (str(tmp_path / "Images" / "2000.jpg"), "other image", 1)]  # identities numbered densely
    coco = [{"image": "train2014/a_1.jpg", "caption": "A cat.", "image_id": "coco_391895"},
            {"image": "val2014/b.jpg", "caption": ["x", "y"]}]
    (tmp_path / "c.json").write_text(json.dumps(coco), encoding="utf-8")
    pairs = load_pairs(str(tmp_path / "c.json"))
    assert [(os.path.relpath(p, tmp_path), c, i) for p, c, i in pairs] == [
        ("train2014/a_1.jpg", "a cat", 0), ("val2014/b.jpg", "x", 1), ("val2014/b.jpg", "y", 1)]
    (tmp_path / "bad.txt").write_text("header\nno separator here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_pairs(str(tmp_path / "bad.txt"))


def test_demo_data_and_tokenizer(tmp_path):
    from internvit.tokenizer import get_tokenizer
    from retrieval.finetune.data import ImageTextPairs

    out = tmp_path / "digits"
    meta = make_digit_pairs(str(out), per_class=3)
    assert meta["num_train_images"] == 20 and meta["num_val_images"] == 10 and len(meta["languages"]) == 3
    train = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert len(train) == 60 and {e["image_id"] for e in train} == {e["image_id"] for e in train[::3]}
    assert any("écrit" in e["caption"] for e in train) and any("数字" in e["caption"] for e in train)
    tok = get_tokenizer(str(out))
    assert tok.vocab_size == meta["vocab_size"] <= 128  # the toy config's vocabulary
    ids = tok.encode("a handwritten digit seven")
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # no <unk> (id 0 is the padding id) in demo captions
    assert tok.decode(ids) == "summarize:a handwritten digit seven"
    for e in train:
        assert 0 not in tok.encode(e["caption"])
    ds = ImageTextPairs(str(out / "train.json"), str(out / "tokenizer.model"), image_size=28, max_length=24)
    item = ds[0]
    s = item["data_samples"]
    assert item["inputs"].shape == (3, 28, 28)
    assert int(s["image_id"]) == 0  # the first identity (image_id strings are numbered densely)
    assert tok.decode(s["text_ids"]) == "summarize:" + train[0]["caption"]
    assert tok.decode(s["match_ids"]) == train[0]["caption"]
    assert tok.decode(s["neg_ids"]) not in {e["caption"] for e in train if e["image_id"] == train[0]["image_id"]}
    assert make_digit_pairs(str(out), per_class=3) == meta  # same settings: kept
    with pytest.raises(FileExistsError, match="other settings"):
        make_digit_pairs(str(out), per_class=3, seed=1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    with pytest.raises(FileExistsError, match="not made by this tool"):
        make_digit_pairs(str(foreign), per_class=3, overwrite=True)
    assert foreign.is_dir()


# -- a real run, and the HF round trip ----------------------------------------------------------------------
def _recall(model, dataset) -> dict:
    from mmengine.dataset import pseudo_collate

    from retrieval.finetune import RetrievalRecall

    metric = RetrievalRecall(ks=(1, 5))
    model.eval()
    batch = pseudo_collate([dataset[i] for i in range(len(dataset))])
    metric.process(None, model(batch["inputs"], batch["data_samples"], mode="predict"))
    return metric.compute_metrics(metric.results)


def test_tiny_finetune_raises_recall_and_saves_a_model_load_model_reads(tmp_path):
    from internvit import load_model
    from internvit.runner import build_train_runner

    data = tmp_path / "digits"
    make_digit_pairs(str(data), per_class=2)  # one training scan per digit: exact-image recall = right digit
    cfg = tmp_path / "cfg.py"
    base = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "retrieval", "toy",
                        "digits_internvl_tiny.py")
    cfg.write_text(f"_base_ = [{os.path.abspath(base)!r}]\n"
                   f"data_root = {str(data)!r}\n"
                   f"tokenizer = data_root + '/tokenizer.model'\n"
                   f"model = dict(tokenizer=tokenizer, config={TINY!r})\n"
                   "train_dataloader = dict(batch_size=30, num_workers=0, persistent_workers=False, "
                   "dataset=dict(annotation=data_root + '/train.json', "
                   "tokenizer=tokenizer, image_size=28))\n"
                   "val_dataloader = dict(dataset=dict(annotation=data_root + '/val_10.json', tokenizer=tokenizer, "
                   "image_size=28))\n"
                   "test_dataloader = val_dataloader\n"
                   "optim_wrapper = dict(optimizer=dict(lr=3e-3))\n"
                   "param_scheduler = [dict(type='WarmupDecayLR', warmup=5, by_epoch=False, begin=0, end=60)]\n"
                   "train_cfg = dict(by_epoch=True, max_epochs=60, val_interval=1000)\n"  # one batch per epoch
                   "default_hooks = dict(logger=dict(interval=1000), checkpoint=dict(interval=1000))\n",
                   encoding="utf-8")
    runner = build_train_runner(str(cfg), work_dir=str(tmp_path / "work"))
    from mmengine.registry import DATASETS

    train_eval = DATASETS.build(dict(type="ImageTextPairs", annotation=str(data / "train.json"), mode="eval",
                                     tokenizer=str(data / "tokenizer.model"), image_size=28, max_length=24))
    model = runner.model
    before = _recall(model, train_eval)
    runner.train()
    after = _recall(model, train_eval)
    for path in ("G", "C"):
        assert after[f"{path}/mean_recall"] > before[f"{path}/mean_recall"] + 0.2, (before, after)
        key = f"{path}/image_retrieval_recall@1"  # text -> image; chance is 0.1
        assert after[key] >= before[key] + 0.3, (before, after)

    saved = tmp_path / "work" / "hf_model"
    assert (saved / "tokenizer.model").is_file() and (saved / "config.json").is_file()
    loaded = load_model(str(saved))
    x, s = fake_batch(3)
    model.eval()
    with torch.no_grad():
        ids = s["text_ids"]
        for mode in ("InternVL-C", "InternVL-G"):
            torch.testing.assert_close(loaded.encode_image(x, mode=mode), model.model.encode_image(x, mode=mode))
        torch.testing.assert_close(loaded.encode_text(ids), model.model.encode_text(ids))
    again = InternVLRetrievalFinetune(pretrained=str(saved))  # continues with the trained itm_head
    torch.testing.assert_close(again.itm_head.weight, model.itm_head.weight)
    # the run's own folder is replaced on a rerun; a foreign one is refused before training
    from retrieval.finetune import SaveHFModelHook

    class _R:
        work_dir = str(tmp_path / "elsewhere")

    os.makedirs(tmp_path / "elsewhere" / "hf_model")
    with pytest.raises(FileExistsError, match="not written by a fine-tuning run"):
        SaveHFModelHook().before_train(_R())


def test_force_image_size_is_saved_and_reloaded(tmp_path):
    from internvit import load_model

    first = tiny_model()
    first.save_pretrained(str(tmp_path / "a"))
    bigger = InternVLRetrievalFinetune(pretrained=str(tmp_path / "a"), image_size=42)
    assert bigger.model.vision_model.embeddings.position_embedding.shape[1] == 1 + 3 * 3
    bigger.save_pretrained(str(tmp_path / "b"))
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["force_image_size"] == 42
    assert load_model(str(tmp_path / "b")).image_size == 42
    with torch.no_grad():
        assert np.isfinite(bigger(torch.randn(2, 3, 42, 42))["InternVL-G"].numpy()).all()


# -- the published recipes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,size,drop,batch,epochs,dataset", [
    ("full", 364, 0.3, 32, 10, "flickr30k_en"), ("full", 364, 0.3, 32, 10, "flickr30k_cn"),
    ("full", 364, 0.3, 32, 5, "coco"), ("head", 224, 0.0, 32, 10, "flickr30k_en"),
    ("head", 224, 0.0, 32, 10, "flickr30k_cn"), ("head", 224, 0.0, 32, 5, "coco")])
def test_published_recipe_configs(recipe, size, drop, batch, epochs, dataset):
    import glob

    from mmengine.config import Config
    from mmengine.registry import MODELS

    from retrieval.finetune import internvl_layer_check_fn, internvl_layer_wrap_policy

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "retrieval", recipe)
    (path,) = glob.glob(os.path.join(root, f"internvl_14b_{recipe}_{dataset}_*.py"))
    cfg = Config.fromfile(path)
    m = cfg.model
    assert (m.recipe, m.image_size, m.drop_path_rate, m.itm) == (recipe, size, drop, True)
    assert m.pretrained == m.tokenizer == "./pretrained/InternVL-14B-224px"
    assert cfg.train_dataloader.batch_size == batch and cfg.train_cfg.max_epochs == epochs
    assert cfg.param_scheduler[0]["end"] == epochs and cfg.param_scheduler[0]["warmup"] == 100
    ann = cfg.train_dataloader.dataset.annotation
    assert {"flickr30k_en": "flickr30k_train_karpathy.txt", "flickr30k_cn": "flickr30k_cn_train.txt",
            "coco": "coco_karpathy_train.json"}[dataset] in ann
    assert cfg.train_dataloader.dataset.image_size == cfg.val_dataloader.dataset.image_size == size
    opt = cfg.optim_wrapper
    assert (opt.optimizer.lr, opt.optimizer.weight_decay, opt.clip_grad.max_norm) == (1e-6, 0.05, 1.0)
    assert opt.paramwise_cfg.flat_decay_mult == 0.0
    assert cfg.runner_type == "FlexibleRunner" and cfg.strategy.type == "FSDPStrategy"
    mp = cfg.strategy.model_wrapper.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype) == ("bfloat16", "float32")
    # the recipe's model, on a tiny architecture: its trainable split, and one FSDP unit per layer
    model = MODELS.build(dict(m, pretrained="internvl-tiny", config=TINY, tokenizer=None, image_size=28))
    names = model.trainable_parameter_names()
    if recipe == "head":
        assert names == ["model.text_projection"]
    else:
        assert len(names) == len(list(model.parameters()))
    units = [mod for mod in model.modules() if internvl_layer_wrap_policy(mod, recurse=False)]
    assert len(units) == 2 + 2 and all(internvl_layer_check_fn(u) for u in units)
    if recipe == "full":  # weight decay as upstream: none on 1-D weights and biases, but on logit_scale
        from mmengine.optim import build_optim_wrapper

        wd = {}
        for group in build_optim_wrapper(model, cfg.optim_wrapper.to_dict()).optimizer.param_groups:
            for p in group["params"]:
                wd[id(p)] = group["weight_decay"]
        named = dict(model.named_parameters())
        assert wd[id(named["model.logit_scale"])] == 0.05
        assert wd[id(named["model.text_projection"])] == wd[id(named["model.query_tokens"])] == 0.05
        assert wd[id(named["itm_head.bias"])] == wd[id(named["model.vision_model.encoder.layers.0.ls1"])] == 0.0


# -- FSDP (the published recipes' strategy) on CPU --------------------------------------------------------------
def test_fsdp_bf16_recipe_loss_backward_and_full_state_dict_export(tmp_path):
    """The strategy of configs/retrieval/_base_/fsdp_bf16.py on one gloo process: one FSDP unit per ViT block and
    QLLaMA layer, bf16 compute, activation checkpointing; one loss + backward; the export hook gathers the full
    state dict and load_model reads it back."""
    import copy

    import torch.distributed as dist
    from mmengine.config import Config
    from mmengine.model import MMFullyShardedDataParallel
    from mmengine.registry import FUNCTIONS, MODEL_WRAPPERS
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from internvit import load_model
    from retrieval.finetune import SaveHFModelHook

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        root = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "retrieval", "_base_", "fsdp_bf16.py")
        strategy = Config.fromfile(root).strategy
        torch.manual_seed(0)
        model = tiny_model()
        reference = copy.deepcopy(model.state_dict())
        wrapper = copy.deepcopy(strategy.model_wrapper.to_dict())
        fsdp = MODEL_WRAPPERS.build(wrapper, default_args=dict(module=model, device_id=torch.device("cpu")))
        apply_activation_checkpointing(fsdp, check_fn=FUNCTIONS.get(strategy.activation_checkpointing.check_fn))
        units = [m for m in fsdp.modules() if isinstance(m, MMFullyShardedDataParallel.__mro__[1])]
        assert len(units) == 1 + 2 + 2  # root, 2 ViT blocks, 2 QLLaMA layers
        fsdp.train()
        x, s = fake_batch(4)
        losses = fsdp(x, s, mode="loss")
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        assert torch.isfinite(total)
        total.backward()
        grads = [p.grad for p in fsdp.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

        class _Runner:
            work_dir = str(tmp_path / "work")
            iter = 1
            logger = __import__("logging").getLogger("test")

        _Runner.model = fsdp
        hook = SaveHFModelHook()
        hook.before_train(_Runner)
        hook.after_train(_Runner)
        loaded = load_model(str(tmp_path / "work" / "hf_model")).state_dict()
        for k, v in reference.items():
            if k.startswith("model."):
                got = loaded[k[len("model."):]]
                torch.testing.assert_close(got, v.reshape(got.shape), msg=k)  # logit_scale: back to a scalar
        assert loaded["logit_scale"].ndim == 0
    finally:
        if own_group:
            dist.destroy_process_group()
