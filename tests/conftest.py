"""Suite-wide set-up: converted ImageNet weights go to a cache of the test session, never the user's."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _weights_cache(tmp_path_factory):
    # os.environ, not monkeypatch: stage subprocesses (dvc, torchrun) inherit it too. One cache for
    # the whole session, so the registry weights are converted once.
    import os

    before = os.environ.get("PRODUCTS10K_CACHE")
    os.environ["PRODUCTS10K_CACHE"] = str(tmp_path_factory.mktemp("products10k-cache"))
    yield
    if before is None:
        os.environ.pop("PRODUCTS10K_CACHE", None)
    else:
        os.environ["PRODUCTS10K_CACHE"] = before
