"""Feature store: contents equal the backbone's output, built once and reused, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _train_data import load, shared_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return shared_project(tmp_path_factory)


class CountingEncoder(torch.nn.Module):
    """The real frozen encoder with a call counter (instrumentation, not a mock)."""

    def __init__(self, params):
        super().__init__()
        from pipeline.features import build_encoder

        self.net = build_encoder(params)
        self.calls = 0
        self.images = 0

    def encode(self, images):
        self.calls += 1
        self.images += images.shape[0]
        return self.net.encode(images)


@pytest.fixture(scope="module")
def built(project):
    from pipeline.features import build_feature_store

    params = load(project)
    enc = CountingEncoder(params)
    path = build_feature_store(params, net=enc, progress=False, batch_size=8, force=True)
    return params, path, enc


def test_store_holds_clean_and_augmented_views_of_every_image(built):
    from pipeline.augment import clean_pair, to_tensor_pair
    from pipeline.features import FeatureStore
    from pipeline.images import load_validated, read_image, read_mask, resolve

    params, path, enc = built
    store = FeatureStore.open(path)
    rows = load_validated(params.data.dir)
    assert sorted(store.ids) == sorted(rows["id"])
    defect = rows[rows["kind"] == "defect"]
    normal = rows[rows["kind"] == "normal"]
    assert len(normal) > 0
    assert all(store.views_of(i) == 1 + params.train.feature_views for i in defect["id"])
    assert all(store.views_of(i) == 1 for i in normal["id"])
    # every view encoded exactly once (+1 probe call of one blank image for the shape)
    assert enc.images == len(defect) * (1 + params.train.feature_views) + len(normal) + 1

    row = defect.iloc[0]
    image = read_image(resolve(params.data.dir, row["image_path"]))
    mask = read_mask(resolve(params.data.dir, row["mask_path"]), params.data.mask_threshold)
    img, m = clean_pair(image, mask, params.train.image_size)
    with torch.inference_mode():
        fresh = enc.net.encode(to_tensor_pair(img, m)[0][None])
    cached = store.get([row["id"]], 0)
    assert cached.dtype == torch.float32 and cached.shape == fresh.shape == (1, *store.feat_shape)
    torch.testing.assert_close(cached, fresh, atol=2e-2, rtol=1e-2)  # float16 storage
    s = params.train.image_size
    stored_mask = store.masks([row["id"]], 0)
    assert stored_mask.shape == (1, 1, s, s)
    assert torch.equal(stored_mask[0, 0].bool(), torch.from_numpy(m))
    # augmented views differ from the clean one but keep binary masks
    aug = store.get([row["id"]] * 2, [1, 2])
    assert not torch.allclose(aug[0], cached[0])
    assert set(torch.unique(store.masks([row["id"]] * 2, [1, 2])).tolist()) <= {0.0, 1.0}


def test_store_is_reused_without_running_the_backbone(built):
    from pipeline.features import build_feature_store

    params, path, _ = built
    mtime = (path / "feats.npy").stat().st_mtime_ns
    enc = CountingEncoder(params)
    assert build_feature_store(params, net=enc, progress=False) == path
    assert enc.calls == 0
    assert (path / "feats.npy").stat().st_mtime_ns == mtime


def test_changed_settings_rebuild_the_store(built, tmp_path):
    from pipeline.features import FeatureStore, build_feature_store

    params, path, _ = built
    key = FeatureStore.open(path).key
    other = load(params.root / "params.yaml", train={"feature_views": 1}, data={"dir": str(params.data.dir)})
    enc = CountingEncoder(other)
    new = build_feature_store(other, net=enc, progress=False)
    assert enc.calls > 0
    store = FeatureStore.open(new)
    assert store.key != key
    assert all(store.views_of(i) <= 2 for i in store.ids)
    assert not any(p.name.startswith(".") for p in new.parent.iterdir())  # no temp folders left
    # restore the module's store for the other tests
    build_feature_store(params, progress=False)


def test_store_errors_name_the_problem(built, tmp_path):
    from pipeline.features import FeatureStore, FeatureStoreError, build_feature_store

    params, path, _ = built
    with pytest.raises(FeatureStoreError, match="lerenet features"):
        FeatureStore.open(tmp_path / "nowhere")
    store = FeatureStore.open(path)
    with pytest.raises(FeatureStoreError, match="not in the feature store"):
        store.get(["0000000000000000"])
    normal_id = next(i for i in store.ids if store.views_of(i) == 1)
    with pytest.raises(FeatureStoreError, match="views 0..0"):
        store.get([normal_id], 1)
    with pytest.raises(FeatureStoreError, match="freeze_backbone"):
        build_feature_store(load(params.root / "params.yaml", model={"freeze_backbone": False}))


def test_index_records_settings(built):
    params, path, _ = built
    meta = json.loads((path / "index.json").read_text())
    assert meta["backbone"] == params.model.backbone
    assert meta["image_size"] == params.train.image_size
    assert meta["feature_views"] == params.train.feature_views
    assert np.load(path / "feats.npy", mmap_mode="r").dtype == np.float16


def test_store_is_built_with_the_thread_policy_not_the_ambient_thread_count(built, monkeypatch):
    """Issue 14 item 2: oneDNN's convolutions give other last bits with another intra-op thread count;
    a store built in a process that had set 2 threads (a flow after a training) must equal one built
    where 1 was set, under the same ``$LERENET_TORCH_THREADS`` -- else the flow's weights drift."""
    from pipeline.features import FeatureStore, build_feature_store

    params, path, _ = built
    before = torch.get_num_threads()
    monkeypatch.setenv("LERENET_TORCH_THREADS", "1")
    try:
        stores = []
        for ambient in (2, 1):
            torch.set_num_threads(ambient)
            out = build_feature_store(params, progress=False, batch_size=8, force=True)
            stores.append((out / "feats.npy").read_bytes())
        assert stores[0] == stores[1]
        assert json.loads((out / "index.json").read_text())["torch_threads"] == 1
    finally:
        monkeypatch.delenv("LERENET_TORCH_THREADS")
        build_feature_store(params, progress=False, batch_size=8, force=True)  # the module's store again
        torch.set_num_threads(before)
    assert FeatureStore.open(path).key
