"""TTA views and batched prediction: every view is what it claims, logits are their mean."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import logsumexp

from products10k.common import ConfigError, DataError
from products10k.contracts.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from products10k.contracts.shards import ImageStore
from products10k.data.transforms import eval_transform
from products10k.evaluation.predict import Prediction, ViewsDataset, predict
from products10k.evaluation.views import BaseView, build_views
from products10k.models.checkpoint import load_model
from products10k.scores import SplitScores
from tests.helpers import config, make_checkpoint, make_eval_data


def _cfg(**kw):
    """One centre view and its flip unless ``kw`` says otherwise."""
    return config("tta", **{"scales": [1.0], "crops": "center", "flip": True, **kw})


def test_build_views_names_sizes_and_order():
    views = build_views(_cfg(scales=[1.0, 8 / 7], crops="five", flip=True), 448, None)
    assert len(views) == 2 * 5 * 2
    assert views[0].name == "448px-center" and not views[0].flip  # first = plain evaluation
    assert views[1].name == "448px-center-flip"
    assert {v.base.resize for v in views} == {512, 585}  # 448*8/7 and 512*8/7, the shorter side
    assert {v.base.resolution for v in views} == {448, 512}
    assert all("." not in v.name for v in views)  # flat dvc metrics keys
    plain = build_views(_cfg(flip=False), 224, 300)
    assert [(v.name, v.base.resize) for v in plain] == [("224px-center", 300)]


def test_tta_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="tta.crops"):
        _cfg(crops="ten")
    with pytest.raises(ConfigError, match=r"key 'tta.scales\[1\]' is 0.0: Input should be greater than 0"):
        _cfg(scales=[1.0, 0.0])
    with pytest.raises(ConfigError, match="duplicate view sizes"):
        build_views(_cfg(scales=[1.0, 1.001]), 32, None)


def test_center_view_is_the_eval_transform_and_corners_are_corners():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    center = BaseView(32, 40, "center").transform()(image)
    ref = eval_transform(40, 32)(image=image)["image"]
    assert torch.equal(center, ref)
    # resize 40 is the image's own shorter side: the corner crops are plain slices, normalised
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for crop, (top, left) in {"top_left": (0, 0), "bottom_right": (8, 28), "top_right": (0, 28)}.items():
        got = BaseView(32, 40, crop).transform()(image)
        want = (image[top : top + 32, left : left + 32] / 255.0 - mean) / std
        assert got.shape == (3, 32, 32)
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_eval_data(tmp_path_factory.mktemp("prepared"))
    ckpt = tmp_path_factory.mktemp("ckpt") / "best.pt"
    make_checkpoint(ckpt, resolution=32)
    model, meta = load_model(ckpt)
    return root, model, meta


def test_predict_averages_the_views_and_reports_each(tiny):
    root, model, meta = tiny
    df = pd.read_csv(root / "val.csv")
    views = build_views(_cfg(scales=[1.0, 1.25], crops="center", flip=True), 32, None)
    pred = predict(model, df, root, views, batch_size=3, top_k=3)
    assert pred.scores.topk_logits.shape == (4, 3) and pred.scores.topk_logits.dtype == np.float32

    # the same thing by hand, one image and one view at a time
    store = ImageStore(root)
    manual = {v.name: [] for v in views}
    with torch.inference_mode():
        for row in df.itertuples():
            image = store.read(row.shard, row.offset, row.length)
            for v in views:
                x = v.base.transform()(image)[None]
                if v.flip:
                    x = torch.flip(x, dims=[-1])
                manual[v.name].append(model(x)[0].numpy())
    stacked = np.stack([np.stack(manual[v.name]) for v in views])  # (V, N, K)
    mean = stacked.mean(0)
    # the streamed top-3 of the view average, its log-sum-exp over all 4 classes and the label's log-prob
    assert pred.scores.topk_labels.tolist() == np.argsort(-mean, axis=1, kind="stable")[:, :3].tolist()
    np.testing.assert_allclose(pred.scores.topk_logits, -np.sort(-mean, axis=1)[:, :3], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pred.scores.logsumexp, logsumexp(mean, axis=1), rtol=1e-4, atol=1e-4)
    labels = df["label"].to_numpy()
    np.testing.assert_allclose(
        pred.scores.label_logprob, mean[np.arange(4), labels] - logsumexp(mean, axis=1), rtol=1e-4, atol=1e-4
    )
    for i, v in enumerate(views):
        assert pred.view_top1[v.name].tolist() == stacked[i].argmax(1).tolist()
        rest = stacked.sum(0) - stacked[i]
        assert pred.without_top1[v.name].tolist() == rest.argmax(1).tolist()
    # flipping really changes the input: the flipped view's logits differ
    assert not np.allclose(stacked[0], stacked[1])


def test_single_view_has_no_leave_one_out(tiny):
    root, model, _ = tiny
    df = pd.read_csv(root / "val.csv")
    pred = predict(model, df, root, build_views(_cfg(flip=False), 32, None), batch_size=8, top_k=4)
    assert list(pred.view_top1) == ["32px-center"] and pred.without_top1 == {}


def test_tta_report():
    top = np.array([[0, 1], [1, 0], [0, 1]])
    scores = SplitScores.from_logits(["a", "b", "c"], [0, 1, 1], np.where(top == 0, 1.0, 0.0), k=2)
    pred = Prediction(
        scores=scores,
        view_top1={"a": np.array([0, 0, 0]), "b": np.array([0, 1, 1])},
        without_top1={"a": np.array([0, 1, 1]), "b": np.array([0, 0, 0])},
    )
    report = pred.tta_report(np.array([0, 1, 1]))
    assert report == {
        "all": pytest.approx(2 / 3),
        "a": pytest.approx(1 / 3),
        "b": pytest.approx(1.0),
        "without_a": pytest.approx(1.0),
        "without_b": pytest.approx(1 / 3),
    }


def test_predict_refuses_an_empty_split_naming_it(tiny):
    root, model, _ = tiny
    df = pd.read_csv(root / "val.csv").iloc[:0]
    with pytest.raises(DataError, match="data/prepared/val.csv: no rows to predict"):
        predict(
            model,
            df,
            root,
            build_views(_cfg(), 32, None),
            top_k=4,
            batch_size=8,
            where="data/prepared/val.csv",
        )


def test_views_decode_from_the_largest_view_never_upsampled(tiny):
    # the 1.25 view (resize 46) must not be made from a reduced decode sized for the 1.0 view (37)
    root, _, _ = tiny
    df = pd.read_csv(root / "val.csv")
    views = build_views(_cfg(scales=[1.0, 1.25], crops="center", flip=False), 32, None)
    ds = ViewsDataset(df, root, views)
    assert ds.images.min_side == max(v.base.resize for v in views)
