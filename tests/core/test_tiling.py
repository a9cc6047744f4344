"""Dynamic-resolution tiling (reference-spec-2 §1.2–1.7): grid rule, tiles, dataset, packing, pooling, shuffle."""
import functools
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from internvit import tiling
from internvit.transforms import dynamic_tiles, tile_grid

# reference-spec-2 §1.3 test vectors: W×H -> (cols, rows) for max_num 6 and 12
SPEC_VECTORS = [
    ((448, 448), (1, 1), (1, 1)), ((1000, 1000), (2, 2), (3, 3)), ((3000, 3000), (2, 2), (3, 3)),
    ((800, 600), (3, 2), (4, 3)), ((600, 800), (2, 3), (3, 4)), ((1024, 768), (3, 2), (4, 3)),
    ((1920, 1080), (2, 1), (4, 2)), ((1080, 1920), (1, 2), (2, 4)), ((1280, 720), (2, 1), (4, 2)),
    ((560, 448), (1, 1), (4, 3)), ((300, 200), (3, 2), (3, 2)), ((100, 50), (2, 1), (2, 1)),
    ((50, 100), (1, 2), (1, 2)), ((64, 64), (1, 1), (1, 1)), ((224, 224), (1, 1), (1, 1)),
    ((2000, 500), (4, 1), (4, 1)), ((4000, 100), (6, 1), (12, 1)),
]


def brute_force_grid(w, h, min_num, max_num, size):
    """Independent restatement of the rule: among all grids at the minimal float distance, the first (smallest
    tile count) is kept unless a later tied grid passes the area test W·H > 0.5·S²·c·r (the last such wins)."""
    grids = [(c, r) for c, r in itertools.product(range(1, max_num + 1), repeat=2) if min_num <= c * r <= max_num]
    dist = {g: abs(w / h - g[0] / g[1]) for g in grids}
    best = min(dist.values())
    tied = sorted((g for g in grids if dist[g] == best), key=lambda g: g[0] * g[1])
    # the spec (derived): grids of equal tile count are never tied, so the order within one count is irrelevant
    assert len({c * r for c, r in tied}) == len(tied), (w, h, tied)
    passing = [g for g in tied[1:] if w * h > 0.5 * size * size * g[0] * g[1]]
    return passing[-1] if passing else tied[0]


@pytest.mark.parametrize("size,g6,g12", SPEC_VECTORS)
def test_spec_vectors(size, g6, g12):
    assert tile_grid(*size, max_num=6) == g6
    assert tile_grid(*size, max_num=12) == g12
    assert tile_grid(*size) == g12  # default max_num is 12


def test_candidate_order_and_count():
    for max_num, count in ((6, 14), (12, 35)):
        grids = tiling.candidate_grids(1, max_num)
        assert len(grids) == count == len(set(grids))
        prods = [c * r for c, r in grids]
        assert prods == sorted(prods)
    assert sorted(tiling.candidate_grids(4, 4)) == [(1, 4), (2, 2), (4, 1)]
    # reference-spec-2 §1.2: upstream's order (CPython set iteration within one tile count)
    assert tiling.candidate_grids(1, 6) == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5),
                                            (5, 1), (6, 1), (2, 3), (1, 6), (3, 2)]
    assert tiling.candidate_grids(1, 12)[:16] == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4),
                                                  (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3), (7, 1), (1, 7)]


def _tie_sizes():
    """Sizes whose aspect ratio sits exactly on a grid ratio or midway between two (where ties happen), at
    pixel counts on both sides of the area thresholds."""
    out = set()
    ratios = sorted({Fraction(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12})
    targets = set(ratios) | {(a + b) / 2 for a, b in zip(ratios, ratios[1:])}
    for t in targets:
        for k in (1, 2, 3, 5, 8, 13, 40, 97, 300):
            w, h = t.numerator * k, t.denominator * k
            if w <= 20000 and h <= 20000:
                out.add((w, h))
    return sorted(out)


def test_sweep_matches_brute_force():
    sizes = [(w, h) for w in range(7, 4000, 131) for h in range(5, 4000, 149)]  # ~830 generic sizes
    sizes += _tie_sizes()  # ~900 sizes at exact and midway ratios
    sizes += [(448 * c, 448 * r) for c in range(1, 13) for r in range(1, 13)]
    assert len(sizes) > 1400
    for (w, h), (mn, mx), s in itertools.product(sizes, ((1, 6), (1, 12), (1, 24), (2, 9)), (448, 224)):
        assert tile_grid(w, h, min_num=mn, max_num=mx, image_size=s) == brute_force_grid(w, h, mn, mx, s), \
            (w, h, mn, mx, s)


@functools.lru_cache(maxsize=None)
def _upstream_candidates(min_num, max_num):
    candidates = set()
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    candidates.add((i, j))
    return tuple(sorted(candidates, key=lambda g: g[0] * g[1]))


def upstream_grid(w, h, min_num, max_num, size):
    """The rule as reference-spec-2 §1.2-1.3 states it: the candidates collected in a Python set (every
    ``(i, j)`` with ``i, j <= n`` for ``n = min_num … max_num`` and ``min_num <= i·j <= max_num``), stable-sorted
    by ``i·j``; walk them keeping the first strictly closer ratio, and on an exactly equal distance take the
    later candidate only if ``W·H > 0.5·S²·i·j``."""
    best, best_diff = (1, 1), float("inf")
    for i, j in _upstream_candidates(min_num, max_num):
        diff = abs(w / h - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * size * size * i * j:
            best = (i, j)
    return best


def test_ties_with_min_num_follow_upstream_order():
    """The tester's cases: with min_num > 1 grids of one tile count tie exactly; upstream's set order decides."""
    assert tile_grid(500, 200, min_num=4, max_num=4) == (4, 1)
    assert tile_grid(1300, 500, min_num=5, max_num=5) == (1, 5)
    pairs = [(mn, mx) for mx in range(1, 41) for mn in range(1, mx + 1)]
    for mn, mx in pairs:
        assert tiling.candidate_grids(mn, mx) == list(_upstream_candidates(mn, mx)), (mn, mx)
    ratios = sorted({Fraction(c, r) for c in range(1, 17) for r in range(1, 17) if c * r <= 16})
    targets = set(ratios) | {(a + b) / 2 for a, b in zip(ratios, ratios[1:])}  # on a ratio and midway: ties
    sizes = {(t.numerator * k, t.denominator * k) for t in targets for k in (1, 2, 100, 700)}
    sizes |= {(w, h) for w in range(1, 3000, 197) for h in range(1, 3000, 211)}
    sizes = sorted((w, h) for w, h in sizes if w <= 20000 and h <= 20000)
    combos = [(mn, mx) for mx in range(2, 17) for mn in range(2, mx + 1)] + [(1, 6), (1, 12), (1, 40)]
    mismatches = [(w, h, mn, mx) for mn, mx in combos for w, h in sizes
                  if tile_grid(w, h, min_num=mn, max_num=mx) != upstream_grid(w, h, mn, mx, 448)]
    assert not mismatches, mismatches[:10]
    assert len(sizes) * len(combos) > 50_000


def test_ties_use_the_area_test():
    # a = 1.25 with max_num 6: (1,1) and (3,2) are both 0.25 away; (3,2) wins only above 0.5*448²*6 = 602112 px
    assert tile_grid(1250, 1000, max_num=6) == (3, 2)   # 1 250 000 px
    assert tile_grid(625, 500, max_num=6) == (1, 1)     # 312 500 px
    # square images: 1x1, 2x2, 3x3 tie; the largest grid that passes the area test wins
    assert tile_grid(448, 448, max_num=12) == (1, 1)
    assert tile_grid(600, 600, max_num=12) == (1, 1)    # 360 000 <= 0.5*448²*4 = 401 408
    assert tile_grid(700, 700, max_num=12) == (2, 2)    # 490 000 > 401 408, <= 0.5*448²*9 = 903 168
    assert tile_grid(951, 951, max_num=12) == (3, 3)    # 904 401 > 903 168


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_num=0), "min_num"), (dict(min_num=5, max_num=4), "max_num"), (dict(image_size=0), "image_size"),
    (dict(image_size=-448), "image_size"), (dict(max_num=2.5), "max_num"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tile_grid(100, 100, **kwargs)
    with pytest.raises(ValueError, match=name):
        dynamic_tiles(Image.new("RGB", (10, 10)), **kwargs)


def test_bad_image_size():
    with pytest.raises(ValueError, match="positive"):
        tile_grid(0, 10)


def _grid_image(cols, rows, s):
    """A cols*s × rows*s image whose tile (c, r) is filled with a colour encoding (c, r)."""
    a = np.zeros((rows * s, cols * s, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            a[r * s:(r + 1) * s, c * s:(c + 1) * s] = (20 * c + 5, 20 * r + 5, 200)
    return Image.fromarray(a)


def test_dynamic_tiles_order_and_thumbnail():
    s = 32
    img = _grid_image(3, 2, s)  # exactly the canvas of a 3x2 grid: the resize keeps every pixel
    assert tile_grid(img.width, img.height, image_size=s, max_num=12) == (3, 2)
    tiles = dynamic_tiles(img, image_size=s)
    assert len(tiles) == 7 and all(t.size == (s, s) for t in tiles)
    for k, t in enumerate(tiles[:6]):
        c, r = k % 3, k // 3  # row-major
        assert np.asarray(t)[0, 0].tolist() == [20 * c + 5, 20 * r + 5, 200]
        assert len(np.unique(np.asarray(t).reshape(-1, 3), axis=0)) == 1
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(img.resize((s, s))))  # thumbnail: whole image squashed
    assert len(dynamic_tiles(img, image_size=s, use_thumbnail=False)) == 6


def test_dynamic_tiles_single_tile_has_no_thumbnail_and_upscales():
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    tiles = dynamic_tiles(img, image_size=448)
    assert len(tiles) == 1 and tiles[0].size == (448, 448)
    # 100x50 -> 2x1 grid + thumbnail; 300x200 -> 3x2 + thumbnail although smaller than one tile (spec §1.4)
    assert len(dynamic_tiles(Image.new("RGB", (100, 50)), image_size=448)) == 3
    assert len(dynamic_tiles(Image.new("RGB", (300, 200)), image_size=448)) == 7


def test_dynamic_tiles_equal_canvas_crops():
    """Tiles are crops of the PIL-resized canvas (default filter), the thumbnail a resize of the original."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (77, 190, 3), dtype=np.uint8))
    cols, rows = tile_grid(190, 77, image_size=28, max_num=6)
    canvas = np.asarray(img.resize((cols * 28, rows * 28), Image.BICUBIC))
    tiles = dynamic_tiles(img, image_size=28, max_num=6)
    assert len(tiles) == cols * rows + 1
    for k in range(cols * rows):
        c, r = k % cols, k // cols
        assert np.array_equal(np.asarray(tiles[k]), canvas[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28])


def test_layout_boxes():
    assert tiling.tile_layout(1000, 500, max_num=12).cols == 2  # 500 000 px: the tied 4x2 fails the area test
    lay = tiling.tile_layout(2000, 1000, max_num=12, image_size=448)
    assert (lay.cols, lay.rows) == (4, 2) and lay.has_thumbnail and lay.num_images == 9
    assert lay.canvas_size == (1792, 896)
    assert lay.boxes[5] == (448, 448, 896, 896)
    assert lay.source_boxes[5] == pytest.approx((500.0, 500.0, 1000.0, 1000.0))


# ---------------------------------------------------------------------------------------------------
# Dataset, packing, pooling
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def tile_images(tmp_path):
    rng = np.random.default_rng(1)
    sizes = [(60, 30), (28, 28), (90, 30), (40, 80)]  # image_size 28, max_num 4: 2x1+t, 1x1, 3x1+t, 1x2+t
    paths = []
    for k, (w, h) in enumerate(sizes):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths.insert(2, str(bad))
    return paths


def test_tile_dataset_items_and_errors(tile_images):
    ds = tiling.TileDataset(tile_images, min_num=1, max_num=4, image_size=28)
    assert ds.num_tiles == [3, 1, 1, 4, 3]  # the unreadable file counts as 1
    x, i, err = ds[0]
    assert i == 0 and err is None
    assert x["pixel_values"].shape == (3, 3, 28, 28)
    assert x["tile_index"].tolist() == [0, 1, 2] and x["is_thumbnail"].tolist() == [False, False, True]
    assert (x["cols"], x["rows"]) == (2, 1)
    x, i, err = ds[2]
    assert x is None and i == 2 and "UnidentifiedImageError" in err
    assert ds.params() == {"min_num": 1, "max_num": 4, "image_size": 28, "use_thumbnail": True}


def test_pack_batches():
    counts = [3, 1, 1, 4, 3, 13, 2]
    batches = tiling.pack_batches(counts, 5)
    assert batches == [[0, 1, 2], [3], [4], [5], [6]]
    assert [i for b in batches for i in b] == list(range(7))
    assert all(sum(counts[i] for i in b) <= 5 or len(b) == 1 for b in batches)
    assert tiling.pack_batches(counts, 8, start=2, end=5) == [[2, 3, 4]]
    with pytest.raises(ValueError, match="max_tiles"):
        tiling.pack_batches(counts, 0)


def test_loader_packs_tiles_of_several_images(tile_images):
    ds = tiling.TileDataset(tile_images, min_num=1, max_num=4, image_size=28)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=tiling.pack_batches(ds.num_tiles, 6),
                                         collate_fn=tiling.collate_tiles)
    out = list(loader)
    pixels, ids, errors, meta = out[0]
    assert ids == [0, 1] and errors == [(2, errors[0][1])] and pixels.shape == (4, 3, 28, 28)
    assert meta["image_id"].tolist() == [0, 0, 0, 1]
    assert meta["tile_index"].tolist() == [0, 1, 2, 0]
    assert meta["is_thumbnail"].tolist() == [False, False, True, False]
    assert meta["cols"].tolist() == [2, 2, 2, 1] and meta["rows"].tolist() == [1, 1, 1, 1]
    assert sum(len(b[1]) for b in out) == 4
    # the tiles in a batch equal the per-image tiles
    single = ds[0][0]["pixel_values"]
    assert torch.equal(pixels[:3], single)


def test_collate_all_failed():
    assert tiling.collate_tiles([(None, 3, "E: x")]) == (None, [], [(3, "E: x")], None)


def test_pool_tiles():
    feats = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    image_id = torch.tensor([4, 4, 4, 7, 9, 9])
    thumb = torch.tensor([False, False, True, False, False, True])
    same, ids = tiling.pool_tiles(feats, image_id, thumb, None)
    assert same is feats and ids == [4, 4, 4, 7, 9, 9]
    mean, ids = tiling.pool_tiles(feats, image_id, thumb, "mean")
    assert ids == [4, 7, 9]
    assert mean.tolist() == [[2.0, 3.0], [6.0, 7.0], [9.0, 10.0]]
    th, ids = tiling.pool_tiles(feats, image_id, thumb, "thumbnail")
    assert th.tolist() == [[4.0, 5.0], [6.0, 7.0], [10.0, 11.0]]
    with pytest.raises(ValueError, match="no thumbnail"):
        tiling.pool_tiles(feats, image_id, torch.zeros(6, dtype=torch.bool), "thumbnail")
    with pytest.raises(ValueError, match="tile_pool"):
        tiling.pool_tiles(feats, image_id, thumb, "max")
    with pytest.raises(ValueError, match="contiguous"):
        tiling.pool_tiles(feats, torch.tensor([1, 2, 1, 3, 3, 3]), thumb, "mean")


def _upstream_style_pixel_shuffle(x, scale_factor=0.5):
    """The InternVL-Chat view/permute sequence (ps_version v2) restated on an (N, G, G, C) tensor."""
    n, w, h, c = x.size()
    x = x.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_index_map():
    g, c = 4, 3
    x = torch.arange(2 * g * g * c, dtype=torch.float32).reshape(2, g * g, c)
    y = tiling.pixel_shuffle(x)
    assert y.shape == (2, 4, 4 * c)
    grid = x.reshape(2, g, g, c)
    for i, j in itertools.product(range(2), repeat=2):
        want = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                          grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
        assert torch.equal(y[:, i * 2 + j], want)


def test_pixel_shuffle_matches_upstream_sequence_at_448():
    x = torch.randn(3, 1024, 8)  # a 448-px tile: 32x32 patches
    y = tiling.pixel_shuffle(x, 0.5)
    assert y.shape == (3, 256, 32)
    ref = _upstream_style_pixel_shuffle(x.reshape(3, 32, 32, 8)).reshape(3, 256, 32)
    assert torch.equal(y, ref)
    # the 4-D input form and another ratio
    assert torch.equal(tiling.pixel_shuffle(x.reshape(3, 32, 32, 8)), y)
    assert torch.equal(tiling.pixel_shuffle(x, 0.25),
                       _upstream_style_pixel_shuffle(x.reshape(3, 32, 32, 8), 0.25).reshape(3, 64, 128))


@pytest.mark.parametrize("shape,ratio,msg", [((1, 1025, 4), 0.5, "square"), ((1, 9, 4), 0.5, "divisible"),
                                             ((1, 16, 4), 0.3, "integer"), ((16, 4), 0.5, "shape")])
def test_pixel_shuffle_errors(shape, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        tiling.pixel_shuffle(torch.zeros(shape), ratio)


def test_tile_counts_match_dynamic_tiles(tile_images):
    for p, n in zip(tile_images, tiling.tile_counts(tile_images, max_num=4, image_size=28)):
        try:
            img = Image.open(p)
        except Exception:  # noqa: BLE001
            assert n == 1
            continue
        assert n == len(dynamic_tiles(img, max_num=4, image_size=28))


# ---------------------------------------------------------------------------------------------------
# Tile features with a real (tiny) InternViT
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    import internvit

    torch.manual_seed(0)
    return internvit.load_model("internvit-6b-tiny").eval()  # 56 px, patch 14: a 4x4 token grid


def test_projector_encoder_is_pixel_shuffle_of_last_hidden_state(tiny):
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got = tiling.projector_encoder(tiny)(x)
        ref = tiling.pixel_shuffle(tiny(x).last_hidden_state[:, 1:], 0.5)  # upstream: drop class token, shuffle
    assert got.shape == (3, 4, 4 * 64) and got.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.fixture
def tiny_tile_images(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for k, (w, h) in enumerate([(120, 60), (56, 56), (150, 50), (50, 100)]):  # 2x1+t, 1x1, 3x1+t, 1x2+t
        p = tmp_path / f"t{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.parametrize("tile_pool", [None, "mean", "thumbnail"])
def test_packed_tile_features_equal_per_image_features(tiny, tiny_tile_images, tile_pool):
    import internvit

    tf = internvit.build_transform(tiny.config)
    ds = tiling.TileDataset(tiny_tile_images, tf, max_num=4, image_size=56)
    assert ds.num_tiles == [3, 1, 4, 3]

    def encode(x):
        return tiny(x).last_hidden_state[:, 0]

    rows, ids, columns = [], [], {}
    loader = torch.utils.data.DataLoader(ds, batch_sampler=tiling.pack_batches(ds.num_tiles, 5),
                                         collate_fn=tiling.collate_tiles)
    with torch.no_grad():
        for pixels, b_ids, errors, meta in loader:
            assert not errors and b_ids
            f, i, c = tiling.encode_tile_batch(encode, pixels, meta, tile_pool)
            rows.append(f)
            ids += i
            for k, v in c.items():
                columns.setdefault(k, []).extend(v)
        feats = torch.cat(rows)
        # reference: each image alone, its tiles from dynamic_tiles
        ref_rows, ref_ids = [], []
        for i, p in enumerate(tiny_tile_images):
            t = torch.stack([tf(x) for x in dynamic_tiles(Image.open(p).convert("RGB"), max_num=4, image_size=56)])
            f = encode(t)
            if tile_pool is None:
                ref_rows.append(f)
                ref_ids += [i] * len(f)
            else:
                ref_rows.append((f.mean(0) if tile_pool == "mean" else f[-1])[None])
                ref_ids.append(i)
    assert ids == ref_ids
    assert torch.allclose(feats, torch.cat(ref_rows), atol=1e-5)
    if tile_pool is None:
        assert columns["tile_index"] == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2]
        assert columns["is_thumbnail"] == [False, False, True, False, False, False, False, True, False, False, True]
        assert columns["cols"][:4] == [2, 2, 2, 1] and columns["rows"][-1] == 2
    else:
        assert columns == {"cols": [2, 1, 3, 1], "rows": [1, 1, 1, 2], "num_tiles": [3, 1, 4, 3]}


def test_tile_counts_follow_exif_orientation(tmp_path):
    """A sideways phone photo (EXIF orientation 6) is tiled upright (1x3, not 3x1); the count read from the
    header (used for packing) equals the tiles made."""
    from internvit.data import load_image

    img = Image.new("RGB", (100, 30), (1, 2, 3))  # stored 100x30, displayed 30x100
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    upright = load_image(str(path))
    assert upright.size == (30, 100)
    n = len(dynamic_tiles(upright, max_num=6, image_size=28))
    assert tiling.tile_counts([str(path)], max_num=6, image_size=28) == [n]
    ds = tiling.TileDataset([str(path)], max_num=6, image_size=28)
    x, _, err = ds[0]
    assert err is None and x["pixel_values"].shape[0] == n and (x["cols"], x["rows"]) == tile_grid(30, 100, max_num=6,
                                                                                                 image_size=28)
