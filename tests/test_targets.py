"""Tests for sslvit.targets: patch convention, k-means tokenizer, masked losses, config errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sslvit import kmeans as K
from sslvit import targets as T
from sslvit.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------


def test_patchify_order_row_major_grid():
    p, gh, gw, c = 2, 3, 4, 3
    img = np.zeros((1, gh * p, gw * p, c), np.float32)
    for i, j in itertools.product(range(gh), range(gw)):
        img[0, i * p : (i + 1) * p, j * p : (j + 1) * p] = i * gw + j  # patch k holds value k
    patches = T.patchify(img, p)
    assert patches.shape == (1, gh * gw, p * p * c)
    np.testing.assert_array_equal(patches[0], np.repeat(np.arange(gh * gw, dtype=np.float32)[:, None], p * p * c, 1))


def test_patchify_inner_order_and_round_trip():
    p, gh, gw, c = 2, 2, 3, 3
    img = np.random.default_rng(0).normal(size=(2, gh * p, gw * p, c)).astype(np.float32)
    patches = T.patchify(img, p)
    # inside a patch: (p1 p2 c), channels fastest
    for k, (p1, p2, ch) in itertools.product(range(gh * gw), itertools.product(range(p), range(p), range(c))):
        i, j = divmod(k, gw)
        assert patches[1, k, (p1 * p + p2) * c + ch] == img[1, i * p + p1, j * p + p2, ch]
    np.testing.assert_array_equal(T.unpatchify(patches, p, (gh, gw), c), img)
    back = T.unpatchify(T.patchify(jnp.asarray(img), p), p, (gh, gw), c)
    assert isinstance(back, jax.Array)
    np.testing.assert_array_equal(np.asarray(back), img)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ConfigError, match="patch_size=4"):
        T.patchify(np.zeros((1, 6, 8, 3), np.float32), 4)


def test_normalize_patches_zero_mean_unit_var():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 10, 48)) * rng.uniform(0.1, 5, size=(4, 10, 1)) + rng.normal(size=(4, 10, 1)) * 3
    for arr in (x.astype(np.float32), jnp.asarray(x, jnp.float32)):
        y = np.asarray(T.normalize_patches(arr))
        np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
        np.testing.assert_allclose(y.var(-1), 1, atol=1e-4)
    assert np.all(T.normalize_patches(np.ones((1, 1, 12), np.float32)) == 0)  # flat patch: no NaN


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


def _blobs(seed, k=8, per=150, d=16, spread=10.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * spread
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + rng.normal(size=(k * per, d))
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), labels[perm]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_blobs(seed):
    x, labels = _blobs(seed)
    # small chunk: exercises the chunked pass with a padded last chunk (1200 = 4 * 256 + 176)
    res = K.kmeans(x, 8, iters=10, seed=seed, chunk_size=256)
    assign = np.asarray(jnp.argmin(K.squared_distances(jnp.asarray(x), res["codebook"]), -1))
    # purity 1 both ways: each blob maps to exactly one code and the codes are distinct
    mapping = {lab: set(assign[labels == lab]) for lab in range(8)}
    assert all(len(v) == 1 for v in mapping.values()), mapping
    assert len({next(iter(v)) for v in mapping.values()}) == 8
    np.testing.assert_array_equal(np.sort(np.asarray(res["counts"])), np.full(8, 150))
    assert float(res["inertia"]) < 1.2 * 16  # ~ D * noise variance


def test_kmeans_deterministic_given_seed():
    x, _ = _blobs(3, k=5, d=6, spread=2.0)  # overlapping blobs: the result depends on the init
    a = K.kmeans(x, 16, iters=5, seed=7)
    b = K.kmeans(x, 16, iters=5, seed=7)
    c = K.kmeans(x, 16, iters=5, seed=8)
    np.testing.assert_array_equal(np.asarray(a["codebook"]), np.asarray(b["codebook"]))
    np.testing.assert_array_equal(np.asarray(a["counts"]), np.asarray(b["counts"]))
    assert not np.array_equal(np.asarray(a["codebook"]), np.asarray(c["codebook"]))


def test_kmeans_reseeds_empty_clusters():
    x, _ = _blobs(4, k=3, per=50, d=4)
    # codes 0 and 1 identical (ties go to 0, so 1 starts empty) and code 3 far from all data
    init = np.stack([x[0], x[0], x[60], np.full(4, 1e3, np.float32)])
    res = K.kmeans(x, 4, iters=1, init_codebook=init)
    counts = np.asarray(res["counts"])
    assert counts.sum() == len(x) and np.all(counts > 0), counts
    # without the re-seeding step those two codes would have stayed empty
    dist = K.squared_distances(jnp.asarray(x), jnp.asarray(init))
    assert np.bincount(np.asarray(jnp.argmin(dist, -1)), minlength=4)[[1, 3]].tolist() == [0, 0]


def test_kmeans_no_empty_clusters_when_k_exceeds_structure():
    x, _ = _blobs(5, k=3, per=100, d=8)  # 3 tight blobs, 40 codes
    counts = np.asarray(K.kmeans(x, 40, iters=10, seed=0)["counts"])
    assert counts.sum() == 300 and counts.min() > 0


# ---------------------------------------------------------------------------------------------
# KMeansTarget end to end: fit from images -> compute tokens
# ---------------------------------------------------------------------------------------------

_PATTERNS = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)


def _pattern_images(rng, n, side=8, p=2):
    """Grayscale images whose 2x2 patches are one of 4 patterns (scaled, shifted, noisy)."""
    g = side // p
    ids = rng.integers(0, 4, size=(n, g * g))
    patches = _PATTERNS[ids] * rng.uniform(0.5, 2, (n, g * g, 1)) + rng.normal(size=(n, g * g, 1))
    patches += 0.01 * rng.normal(size=patches.shape)
    return T.unpatchify(patches.astype(np.float32), p, (g, g), 1), ids


def test_kmeans_target_fit_and_compute():
    rng = np.random.default_rng(0)
    target = T.make_target("kmeans", patch_size=2, channels=1, vocab_size=4, num_samples=600, iters=5)
    batches = ({"image": _pattern_images(rng, 16)[0], "label": np.zeros(16)} for _ in itertools.count())
    state = target.fit(batches, rng=0)
    assert state["codebook"].shape == (4, 4) and state["counts"].sum() == 600
    images, ids = _pattern_images(np.random.default_rng(1), 8)
    tokens = jax.jit(target.compute)(state, images)
    assert tokens.dtype == jnp.int32 and tokens.shape == (8, 16)
    tokens = np.asarray(tokens)
    # token <-> pattern is a bijection (the per-patch scale/shift is normalised away)
    pairs = set(zip(ids.ravel().tolist(), tokens.ravel().tolist()))
    assert len(pairs) == 4 and len({t for _, t in pairs}) == 4
    assert 0.15 < target.chance_accuracy(state) < 0.4  # ~0.25 for 4 equiprobable patterns


def test_kmeans_target_fit_deterministic_and_saves(tmp_path):
    target = T.make_target("kmeans", patch_size=2, channels=1, vocab_size=8, num_samples=300, iters=3)

    def images():
        rng = np.random.default_rng(0)
        while True:
            yield _pattern_images(rng, 8)[0]

    s1 = T.fit_or_load(target, {"name": "kmeans", "path": None}, images, seed=3, run_dir=tmp_path / "a")
    s2 = target.fit(images(), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(s1["codebook"], s2["codebook"])
    saved = tmp_path / "a" / T.TOKENIZER_FILENAME
    assert saved.is_file()

    def no_images():
        raise AssertionError("must not build the data pipeline when loading")

    s3 = T.fit_or_load(target, {"path": str(saved)}, no_images, seed=0, run_dir=tmp_path / "b")
    np.testing.assert_array_equal(s3["codebook"], s1["codebook"])
    np.testing.assert_array_equal(s3["counts"], s1["counts"])
    assert (tmp_path / "b" / T.TOKENIZER_FILENAME).is_file()

    other = T.make_target("kmeans", patch_size=2, channels=1, vocab_size=16, num_samples=300)
    with pytest.raises(ConfigError, match="vocab_size"):
        other.load(saved)
    with pytest.raises(ConfigError, match="patch_size"):
        T.make_target("kmeans", patch_size=4, channels=1, vocab_size=8, num_samples=300).load(saved)
    with pytest.raises(ConfigError, match="no such file"):
        target.load(tmp_path / "missing.npz")


def test_fit_raises_when_too_few_patches():
    target = T.make_target("kmeans", patch_size=2, channels=1, vocab_size=64, num_samples=1000)
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="vocab_size=64"):
        target.fit([_pattern_images(rng, 2)[0]], rng=0)  # 2 images * 4 patches each


# ---------------------------------------------------------------------------------------------
# Losses and metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kmeans", "pixel"])
def test_loss_counts_only_masked_positions(name):
    target = T.make_target(name, patch_size=2, vocab_size=10) if name == "kmeans" else T.make_target(name, patch_size=2)
    rng = np.random.default_rng(0)
    b, n, k = 2, 6, target.num_outputs
    preds = jnp.asarray(rng.normal(size=(b, n, k)), jnp.float32)
    if name == "kmeans":
        tgts = jnp.asarray(rng.integers(0, k, size=(b, n)), jnp.int32)
    else:
        tgts = jnp.asarray(rng.normal(size=(b, n, k)), jnp.float32)
    mask = jnp.asarray(rng.random((b, n)) < 0.5).at[0, 0].set(False).at[1, 2].set(True)
    loss_fn = jax.jit(target.loss)
    base, _ = loss_fn(preds, tgts, mask)
    delta = jnp.asarray(rng.normal(size=k), jnp.float32) * 5.0  # not constant: softmax ignores shifts
    unmasked_changed, _ = loss_fn(preds.at[0, 0].add(delta), tgts, mask)
    masked_changed, _ = loss_fn(preds.at[1, 2].add(delta), tgts, mask)
    assert float(unmasked_changed) == float(base)
    assert abs(float(masked_changed) - float(base)) > 1e-3


def test_kmeans_loss_accuracy_hand_made():
    target = T.make_target("kmeans", patch_size=2, vocab_size=3)
    logits = jnp.asarray([[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [0, 5.0, 0]]])  # argmax 0, 1, 2, 1
    tgts = jnp.asarray([[0, 1, 0, 0]], jnp.int32)
    mask = jnp.asarray([[True, True, True, False]])  # last (wrong) one is not counted
    loss, metrics = target.loss(logits.astype(jnp.bfloat16), tgts, mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(metrics["accuracy"]), 2 / 3, rtol=1e-6)
    logp = jax.nn.log_softmax(logits, -1)
    expected = -(logp[0, 0, 0] + logp[0, 1, 1] + logp[0, 2, 0]) / 3
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["codebook_usage"]), 2 / 3)  # codes {0, 1} of 3


def test_codebook_usage():
    target = T.make_target("kmeans", patch_size=2, vocab_size=4)
    tgts = jnp.asarray([[0, 1, 1], [3, 3, 0]], jnp.int32)
    _, metrics = target.loss(jnp.zeros((2, 3, 4)), tgts, jnp.ones((2, 3), bool))
    assert float(metrics["codebook_usage"]) == 0.75


def test_chance_accuracy():
    target = T.make_target("kmeans", patch_size=2, vocab_size=4)
    assert target.chance_accuracy({"codebook": np.zeros((4, 12)), "counts": np.array([1, 3, 6, 0])}) == 0.6


def test_pixel_target():
    target = T.make_target("pixel", patch_size=4, name="pixel", normalize=True)
    assert target.num_outputs == 48
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)) * 3 + 1, jnp.float32)
    tgts = target.compute({}, images)
    assert tgts.shape == (2, 4, 48)
    np.testing.assert_allclose(np.asarray(tgts).mean(-1), 0, atol=1e-5)
    mask = jnp.asarray([[True, False, True, False], [False, False, False, True]])
    loss, metrics = target.loss(tgts, tgts, mask)
    assert float(loss) == 0.0 and float(metrics["mse"]) == 0.0
    loss, _ = target.loss(tgts + 2.0, tgts, mask)
    np.testing.assert_allclose(float(loss), 4.0, rtol=1e-6)
    raw = T.make_target("pixel", patch_size=4, normalize=False)
    np.testing.assert_array_equal(np.asarray(raw.compute({}, images)), np.asarray(T.patchify(images, 4)))


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 0, 65537, 2.5, True, "512"])
def test_vocab_size_validation(bad):
    with pytest.raises(ConfigError, match="target.vocab_size"):
        T.make_target("kmeans", patch_size=4, vocab_size=bad)


def test_config_errors():
    with pytest.raises(ConfigError, match="target.name='dvae' is not a target: choose one of kmeans, pixel"):
        T.make_target("dvae", patch_size=4)
    with pytest.raises(ConfigError, match="target.vocab_sise is not an option of target 'kmeans'"):
        T.make_target("kmeans", patch_size=4, vocab_sise=512)
    with pytest.raises(ConfigError, match="target.num_samples"):
        T.make_target("kmeans", patch_size=4, vocab_size=512, num_samples=100)
    with pytest.raises(ConfigError, match="target.normalize"):
        T.make_target("pixel", patch_size=4, normalize="yes")
    # a full config mapping (as from conf/target/kmeans.yaml) is accepted
    t = T.make_target(
        "kmeans",
        patch_size=4,
        **{"name": "kmeans", "vocab_size": 512, "num_samples": 100000, "iters": 20, "path": None},
    )
    assert t.num_outputs == 512 and t.iters == 20
    assert isinstance(t, T.TARGETS.get("kmeans"))


def test_kmeans_random_init_for_large_vocab(monkeypatch):
    monkeypatch.setattr(K, "MAX_PLUSPLUS_K", 4)  # take the large-vocabulary path on small data
    x, _ = _blobs(6, k=3, per=100, d=8)
    res = K.kmeans(x, 12, iters=5, seed=0)
    counts = np.asarray(res["counts"])
    assert counts.sum() == 300 and counts.min() > 0
    np.testing.assert_array_equal(np.asarray(K.kmeans(x, 12, iters=5, seed=0)["codebook"]), np.asarray(res["codebook"]))


@pytest.mark.parametrize("max_entries", [1, 7 * 40, 13 * 40, 10**9])
def test_nearest_code_in_codebook_chunks_equals_one_argmin(max_entries):
    """The chunked walk over the codebook (used when rows x codes is large) picks exactly the codes of one argmin
    over all distances, including ties (duplicated codes: the lower index wins) and a last, partial chunk."""
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((37, 12)).astype(np.float32)
    codebook[20] = codebook[3]  # a tie: 3 must win
    x = np.concatenate([rng.standard_normal((35, 12)), codebook[[3, 36, 0]] + 1e-3]).astype(np.float32)
    want = np.asarray(jnp.argmin(K.squared_distances(jnp.asarray(x), jnp.asarray(codebook)), axis=-1))
    got = np.asarray(jax.jit(K.nearest_code, static_argnums=2)(jnp.asarray(x), jnp.asarray(codebook), max_entries))
    np.testing.assert_array_equal(got, want)
    assert got[-3] == 3 and got[-2] == 36 and got[-1] == 0
    assert got.dtype == np.int32
