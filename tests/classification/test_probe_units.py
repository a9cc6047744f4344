"""Probe heads, preprocessor, metric, datasets and checkpoints: unit behaviour against independent references."""
import hashlib
import os

import numpy as np
import pytest
import torch

import classification
from classification import probes
from classification.datasets import ImageFolderDataset, make_toy_digits
from classification.metrics import Accuracy
from classification.probes import (
    AttentionPoolingHead,
    ClsDataPreprocessor,
    ClsPatchConcatHead,
    InternViTClassifier,
    TrainableEMA,
    load_head_weights,
)

TINY = "internvit-6b-tiny"


# ---------------------------------------------------------------------------------------------------
# Registry and package
# ---------------------------------------------------------------------------------------------------
def test_registry_scope_builds_through_mmengine_root():
    from mmengine.registry import MODELS as ROOT_MODELS
    from mmengine.registry import DefaultScope

    from classification.registry import DATASETS, METRICS, MODELS

    assert MODELS.scope == DATASETS.scope == METRICS.scope == "classification"
    assert MODELS.parent is ROOT_MODELS
    with DefaultScope.overwrite_default_scope("classification"):
        head = ROOT_MODELS.build(dict(type="ClsPatchConcatHead", in_channels=8, num_classes=3))
        ema_type = ROOT_MODELS.get("classification.TrainableEMA")
    assert isinstance(head, ClsPatchConcatHead) and ema_type is TrainableEMA
    assert METRICS.get("Accuracy") is Accuracy and DATASETS.get("ImageFolderDataset") is ImageFolderDataset


def test_zero_shot_names_are_lazy():
    for name in ("build_zero_shot_classifier", "zero_shot_evaluate", "load_classnames", "load_templates"):
        assert name not in vars(classification)  # resolved on access, not at import
        from classification import zero_shot

        assert getattr(classification, name) is getattr(zero_shot, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        classification.nope  # noqa: B018


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------
def test_head_parameter_counts_match_reference():
    # "number of params: 6413800" in the reference's linear-probe log (BN 6400 + Linear 6400 -> 1000)
    with torch.device("meta"):
        linear = ClsPatchConcatHead(3200, 1000)
        attn = AttentionPoolingHead(3200, 1000, num_heads=25)
    assert sum(p.numel() for p in linear.parameters()) == 6_413_800
    assert attn.attn_pooling.cross_attn.num_heads == 25 and attn.attn_pooling.cross_attn.head_dim == 128
    assert tuple(attn.norm.weight.shape) == (3200,) and tuple(attn.fc.weight.shape) == (1000, 3200)
    assert linear.norm.eps == attn.norm.eps == 1e-6 and attn.attn_pooling.norm1_q.eps == 1e-5


def test_cls_patch_concat_pooling_and_bad_shapes():
    tokens = torch.randn(2, 5, 4)
    head = ClsPatchConcatHead(4, 3).eval()
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].sum(1) / 4], dim=-1)
    torch.testing.assert_close(head.pool(tokens), expected)
    torch.testing.assert_close(head(tokens), head(expected))  # tokens and pooled features: same logits
    with pytest.raises(ValueError, match=r"expected \(B, N, 4\) tokens or \(B, 8\)"):
        head(torch.randn(2, 7))
    with pytest.raises(ValueError, match="feature='tokens'"):
        AttentionPoolingHead(4, 3, num_heads=2)(torch.randn(2, 8))


def test_cached_features_equal_on_the_fly_head_inputs():
    """The FeatureExtractor outputs the cache stores are exactly what the heads compute from the tokens."""
    from internvit import FeatureExtractor

    model = probes.build_backbone(dict(arch=TINY))
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        tokens = model.forward_features(x)
    cls_mean = FeatureExtractor(model, preprocess=dict(image_size=56), pool="cls_mean", progress=False).encode(x)
    torch.testing.assert_close(cls_mean, ClsPatchConcatHead.pool(tokens), rtol=0, atol=0)
    flat = FeatureExtractor(model, preprocess=dict(image_size=56), progress=False,
                            embed_fn=lambda t: model.forward_features(t).flatten(1)).encode(x)
    torch.testing.assert_close(flat.reshape(tokens.shape), tokens, rtol=0, atol=0)


def test_backbone_from_an_internvl_checkpoint_reads_only_the_vision_tower(internvl_fixture):
    import internvit

    vit = probes.build_backbone(dict(pretrained=internvl_fixture))
    full = internvit.load_model(internvl_fixture)
    assert isinstance(vit, internvit.InternViT) and not any(p.requires_grad for p in vit.parameters())
    assert vit.load_report.ignored  # the text tower and projectors were skipped, not loaded
    for k, v in full.vision_model.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k


def test_backbone_random_init_is_seeded_and_frozen():
    a, b = probes.build_backbone(dict(arch=TINY, init_seed=3)), probes.build_backbone(dict(arch=TINY, init_seed=3))
    c = probes.build_backbone(dict(arch=TINY, init_seed=4))
    wa, wb, wc = (m.encoder.layers[0].attn.qkv.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    with pytest.raises(ValueError, match="unknown keys"):
        probes.backbone_spec(dict(arch=TINY, layers=3))


# ---------------------------------------------------------------------------------------------------
# Mixup / CutMix and the loss
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_mixup_cutmix_matches_timm(seed):
    Mixup = pytest.importorskip("timm.data").Mixup

    k, smoothing = 10, 0.1
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, k, (8,))
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=smoothing, num_classes=k)
    np.random.seed(seed)
    x_ref, t_ref = timm_mix(x.clone(), y.clone())
    ours = ClsDataPreprocessor(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, num_classes=k)
    np.random.seed(seed)
    x_mix, soft = ours.mix(x.clone(), y.clone())
    torch.testing.assert_close(x_mix, x_ref)
    torch.testing.assert_close(soft * (1 - smoothing) + smoothing / k, t_ref)  # smoothing is the loss's job


def test_preprocessor_mixes_only_in_training_and_needs_even_batches():
    pre = ClsDataPreprocessor(mixup_alpha=0.8, num_classes=4)
    data = dict(inputs=torch.randn(4, 3, 8, 8), data_samples=dict(gt_label=torch.tensor([0, 1, 2, 3])))
    assert "soft_label" not in pre(data, training=False)["data_samples"]
    out = pre(data, training=True)
    torch.testing.assert_close(out["data_samples"]["soft_label"].sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="even batch size"):
        pre(dict(inputs=torch.randn(3, 3, 8, 8), data_samples=dict(gt_label=torch.tensor([0, 1, 2]))), True)


def test_loss_soft_targets_agree_with_hard_label_cross_entropy():
    model = InternViTClassifier(dict(arch=TINY), dict(type="ClsPatchConcatHead", num_classes=5),
                                from_features=True, label_smoothing=0.1)
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    hard = model.loss(logits, dict(gt_label=labels))
    soft = model.loss(logits, dict(gt_label=labels, soft_label=torch.nn.functional.one_hot(labels, 5).float()))
    ref = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(hard, ref)
    torch.testing.assert_close(soft, ref)


# ---------------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------------
def test_accuracy_metric_matches_sklearn():
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    scores = rng.random((200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    metric = Accuracy(topk=(1, 3, 5), mean_recall=True)
    metric.dataset_meta = {"classes": tuple("abcdefg")}
    metric.process(None, [dict(pred_score=torch.from_numpy(s), gt_label=int(g)) for s, g in zip(scores, labels)])
    out = metric.evaluate(200)
    for k in (1, 3, 5):
        assert out[f"accuracy/top{k}"] == pytest.approx(100 * top_k_accuracy_score(labels, scores, k=k), abs=1e-4)
    assert out["accuracy/mean_recall"] == pytest.approx(
        100 * balanced_accuracy_score(labels, scores.argmax(1)), abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Datasets and the toy set
# ---------------------------------------------------------------------------------------------------
def test_folder_and_csv_layouts_agree(toy_digits):
    folder = ImageFolderDataset(toy_digits, split="val", transform=dict(image_size=28))
    csv = ImageFolderDataset(toy_digits, ann_file="val.csv", classes=os.path.join(toy_digits, "classes.txt"),
                             transform=dict(image_size=28))
    assert sorted(map(os.path.abspath, folder.paths)) == sorted(map(os.path.abspath, csv.paths))
    assert dict(zip(map(os.path.abspath, folder.paths), folder.labels)) == \
        dict(zip(map(os.path.abspath, csv.paths), csv.labels))
    assert folder.metainfo["classes"] == tuple(str(i) for i in range(10))
    item = folder[0]
    assert item["inputs"].shape == (3, 28, 28) and item["data_samples"]["gt_label"] == folder.labels[0]
    assert len(folder) == 359 and len(ImageFolderDataset(toy_digits, split="train")) == 1438


def test_dataset_errors_name_the_problem(toy_digits, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(str(tmp_path / "nowhere"), split="train")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\ntrain/0/0000.png,zero\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: unknown label 'zero'"):
        ImageFolderDataset(toy_digits, ann_file=str(bad), classes=[str(i) for i in range(10)])
    missing = tmp_path / "missing.csv"
    missing.write_text("gone.png,3\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderDataset(toy_digits, ann_file=str(missing))
    with pytest.raises(ValueError, match="unknown keys"):
        ImageFolderDataset(toy_digits, split="val", transform=dict(size=3))


def _tree_hash(root):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(dirpath, f), root).encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_toy_dataset_is_deterministic_and_guarded(toy_digits, tmp_path):
    import importlib.util

    copy = tmp_path / "again"
    spec = importlib.util.spec_from_file_location(
        "make_toy_cls_dataset", os.path.join(os.path.dirname(classification.__file__), "..", "tools",
                                             "make_toy_cls_dataset.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(copy)]) == 0
    assert _tree_hash(copy) == _tree_hash(toy_digits)
    assert cli.main([str(copy)]) == 0  # the same dataset is kept
    assert cli.main([str(copy), "--seed", "1"]) == 2  # a different one is refused without --overwrite
    assert cli.main([str(tmp_path / "x"), "--val-fraction", "1.5"]) == 2
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(FileExistsError):
        make_toy_digits(str(copy), seed=1)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: head-only state dicts, EMA sharing, published head files
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    import internvit

    path = str(tmp_path_factory.mktemp("vit") / "tiny")
    internvit.save_model(probes.build_backbone(dict(arch=TINY, init_seed=7)), path)
    return path


def test_frozen_pretrained_backbone_is_left_out_of_checkpoints(tiny_pretrained):
    spec = dict(arch=TINY, pretrained=tiny_pretrained)
    model = InternViTClassifier(spec, dict(type="AttentionPoolingHead", num_classes=4))
    keys = list(model.state_dict())
    assert keys and all(k.startswith("head.") for k in keys)
    fresh = InternViTClassifier(spec, dict(type="AttentionPoolingHead", num_classes=4))
    fresh.load_state_dict(model.state_dict(), strict=True)  # the backbone comes from `pretrained`
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])
    torch.testing.assert_close(fresh.backbone.embeddings.class_embedding, model.backbone.embeddings.class_embedding)
    random_init = InternViTClassifier(dict(arch=TINY), dict(type="ClsPatchConcatHead", num_classes=4))
    assert any(k.startswith("backbone.") for k in random_init.state_dict())  # not reproducible from a file


def test_trainable_ema_shares_the_frozen_backbone():
    model = InternViTClassifier(dict(arch=TINY), dict(type="ClsPatchConcatHead", num_classes=4))
    ema = TrainableEMA(model, momentum=0.25, update_buffers=True)
    w = model.backbone.encoder.layers[0].mlp.fc1.weight
    assert ema.module.backbone.encoder.layers[0].mlp.fc1.weight is w
    assert ema.module.head.fc.weight is not model.head.fc.weight
    assert not any(k.startswith("backbone.") for k in ema.avg_parameters)
    ema.update_parameters(model)
    start = model.head.fc.weight.detach().clone()
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.head.fc.weight, start + 0.25)


def test_published_head_checkpoint_loads(tmp_path):
    model = InternViTClassifier(dict(arch=TINY), dict(type="ClsPatchConcatHead", num_classes=4),
                                from_features=True)
    sd = {"norm.weight": torch.rand(128), "norm.bias": torch.rand(128), "norm.running_mean": torch.rand(128),
          "norm.running_var": torch.rand(128), "norm.num_batches_tracked": torch.tensor(5),
          "head.weight": torch.rand(4, 128), "head.bias": torch.rand(4)}
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "head.pth"
    torch.save({"model": sd, "model_ema": ema}, path)
    load_head_weights(model, str(path))
    assert torch.equal(model.head.fc.weight, sd["head.weight"]) and torch.equal(model.head.norm.bias, sd["norm.bias"])
    load_head_weights(model, str(path), ema=True)
    assert torch.equal(model.head.fc.weight, ema["head.weight"])
    converted = classification.convert_head_checkpoint(str(path), str(tmp_path / "mm" / "head.pth"))
    fresh = InternViTClassifier(dict(arch=TINY), dict(type="ClsPatchConcatHead", num_classes=4), from_features=True)
    fresh.load_state_dict(torch.load(converted, weights_only=True)["state_dict"], strict=True)
    assert torch.equal(fresh.head.norm.running_var, sd["norm.running_var"])
    torch.save({"model": dict(sd, **{"head.weight": torch.rand(5, 128)})}, path)
    from internvit import CheckpointError

    with pytest.raises(CheckpointError, match="mis-shaped head weights: .*head.fc.weight"):
        load_head_weights(model, str(path))


def test_cached_features_refuse_to_extract_in_a_distributed_run(toy_digits, tmp_path, monkeypatch):
    """A cold cache under torchrun is an error on every rank (rank 0 alone would extract while the others
    time out at a barrier); a warm cache is read by every rank."""
    import mmengine.dist

    from classification.feature_cache import CachedFeatureDataset

    images = ImageFolderDataset(toy_digits, split="val", transform=dict(image_size=28))
    images.samples = images.samples[:4]
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(mmengine.dist, "get_world_size", lambda *a, **k: 2)
    with pytest.raises(RuntimeError, match="single-process run"):
        CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False)
    assert not os.path.exists(cache)
    monkeypatch.undo()
    assert CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False).extracted
    monkeypatch.setattr(mmengine.dist, "get_world_size", lambda *a, **k: 2)
    warm = CachedFeatureDataset(images, dict(arch=TINY), cache, progress=False)
    assert not warm.extracted and len(warm.labels) == 4
