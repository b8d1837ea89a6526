"""Unit: `open_store` picks the store from the repository argument; s3:// URLs are parsed at the edge.

No I/O: building an `S3Store` only builds a boto3 client (no request is sent).
"""

from __future__ import annotations

import pytest

from nbdbackup.agent.repo import DirStore, open_store
from nbdbackup.agent.s3store import S3Store, parse_url
from nbdbackup.errors import ConfigError


def test_parse_url():
    assert parse_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_url("s3://bucket") == ("bucket", "")
    for bad in ("s3:///p", "s3://b/p?x=1", "s3://b/../p", "http://b/p"):
        with pytest.raises(ConfigError):
            parse_url(bad)


def test_open_store(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert isinstance(open_store(str(tmp_path)), DirStore)
    s = open_store("s3://bkt/vm1")
    assert isinstance(s, S3Store) and s.root == "s3://bkt/vm1" and s._key("chunks/ab/c") == "vm1/chunks/ab/c"
    assert s.client.meta.endpoint_url == "http://127.0.0.1:1" and s.client.meta.region_name == "us-east-1"
    assert open_store("s3://bkt/vm1", endpoint="http://127.0.0.2:9").client.meta.endpoint_url == "http://127.0.0.2:9"
    assert s.gc_grace > 0 and DirStore(str(tmp_path)).gc_grace == 0
    with pytest.raises(ConfigError, match="a directory or s3://"):
        open_store("gs://bkt/p")
    with pytest.raises(ConfigError, match="--s3-endpoint is for s3://"):
        open_store(str(tmp_path), endpoint="http://x")
