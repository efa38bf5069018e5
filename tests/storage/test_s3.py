"""S3Store against moto's S3 server over real HTTP (127.0.0.1).

moto verifies neither signatures nor expiry of presigned URLs, so these tests check what our code
controls — the key, method, expiry and credential scope inside each URL, verified here with an
independent SigV4 computation — and use the URLs over HTTP to show they address the right object.
Refusing a URL whose signature, method, key or expiry does not match is the object store's job
(MinIO/S3 do it); it cannot be shown against moto.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import pytest
import requests

from jipfed.storage.base import ObjectExistsError, ObjectNotFoundError, StoreError
from jipfed.storage.factory import open_store
from jipfed.storage.s3 import S3Store, split_endpoint
from jipfed.testing.s3 import S3TestServer

KEY = "experiments/e1/rounds/0/global.safetensors"
MIB = 1024 * 1024


def sigv4_query_signature(url: str, method: str, secret_key: str, path: str | None = None) -> str:
    """The SigV4 signature S3 expects for presigned ``url`` used with ``method`` (and ``path``)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.pop("X-Amz-Signature")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
    )
    canonical_request = "\n".join(
        [method, path or parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = query["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            query["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def url_query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def test_round_trip_with_prefix(s3_server: S3TestServer, s3_store: S3Store) -> None:
    s3_store.put_bytes(KEY, b"weights")
    s3_store.put_json("experiments/e1/rounds/0/global.json", {"round": 0})
    s3_store.put_bytes("experiments/e1/rounds/10/aggregate.json", b"{}")
    assert s3_store.get_bytes(KEY) == b"weights"
    assert s3_store.get_json("experiments/e1/rounds/0/global.json") == {"round": 0}
    assert s3_store.exists(KEY) and not s3_store.exists("experiments/e1/rounds/0/other")
    assert s3_store.list("experiments/e1/rounds/0/") == [
        "experiments/e1/rounds/0/global.json",
        "experiments/e1/rounds/0/global.safetensors",
    ]
    assert s3_store.list("experiments/e1/rounds/1") == ["experiments/e1/rounds/10/aggregate.json"]
    assert len(s3_store.list()) == 3
    # the objects really live below the store's prefix in the bucket
    raw = s3_server.client().get_object(s3_server.bucket, f"{s3_store.prefix}/{KEY}")
    assert raw.read() == b"weights"
    raw.close()
    assert s3_server.make_store(prefix="another").list() == []
    with pytest.raises(ObjectNotFoundError, match="'nothing/here' does not exist"):
        s3_store.get_bytes("nothing/here")


def test_no_overwrite_names_the_key_and_keeps_the_original(s3_store: S3Store) -> None:
    s3_store.put_bytes(KEY, b"first")
    with pytest.raises(ObjectExistsError, match=f"'{KEY}' already exists"):
        s3_store.put_bytes(KEY, b"second")
    assert s3_store.get_bytes(KEY) == b"first"
    s3_store.put_bytes(KEY, b"third", overwrite=True)
    assert s3_store.get_bytes(KEY) == b"third"


class FailingStream(io.RawIOBase):
    """``size`` bytes of which only ``fail_after`` arrive; ``on_fail`` runs before the error."""

    def __init__(self, fail_after: int, on_fail=None) -> None:
        self._left = fail_after
        self._on_fail = on_fail

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            if self._on_fail is not None:
                self._on_fail()
            raise OSError("trainer died mid-upload")
        n = min(size if size > 0 else MIB, self._left)
        self._left -= n
        return b"\x01" * n


def test_interrupted_multipart_upload_leaves_no_object(s3_server: S3TestServer) -> None:
    """Part 1 (5 MiB) is uploaded, part 2 fails: the upload is aborted, nothing appears."""
    store = s3_server.make_store(prefix="multipart", part_size=5 * MIB)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
    )
    pending_at_failure: list[list[str]] = []

    def pending() -> list[str]:
        return [u["Key"] for u in s3.list_multipart_uploads(Bucket=s3_server.bucket).get("Uploads", [])]

    stream = FailingStream(7 * MIB, on_fail=lambda: pending_at_failure.append(pending()))
    with pytest.raises(OSError, match="trainer died"):
        store.put_stream(KEY, stream, 12 * MIB)
    assert pending_at_failure == [[f"multipart/{KEY}"]]  # a multipart upload was really under way
    assert not store.exists(KEY)
    assert store.list() == []
    assert pending() == []  # aborted: no parts left behind


def test_interrupted_overwrite_keeps_the_old_object(s3_store: S3Store) -> None:
    s3_store.put_bytes(KEY, b"old model")
    with pytest.raises(OSError):
        s3_store.put_stream(KEY, FailingStream(1000), 2000, overwrite=True)
    assert s3_store.get_bytes(KEY) == b"old model"


def test_presigned_urls_are_scoped_and_work_over_http(s3_server: S3TestServer, s3_store: S3Store) -> None:
    s3_store.put_bytes(KEY, b"global model")
    update_key = "experiments/e1/rounds/0/updates/site-a.safetensors"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    get_url = s3_store.presign_get(KEY, timedelta(minutes=5))
    put_url = s3_store.presign_put(update_key, 120)

    for url, key, method, other, expires in (
        (get_url, KEY, "GET", "PUT", "300"),
        (put_url, update_key, "PUT", "GET", "120"),
    ):
        parts, query = urlsplit(url), url_query(url)
        assert f"{parts.scheme}://{parts.netloc}" == s3_server.endpoint_url
        assert parts.path == f"/{s3_server.bucket}/{s3_store.prefix}/{key}"
        assert query["X-Amz-Expires"] == expires
        assert query["X-Amz-SignedHeaders"] == "host"
        access, date, region, service, _ = query["X-Amz-Credential"].split("/")
        assert (access, region, service) == (s3_server.access_key, s3_server.region, "s3")
        signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        assert before <= signed_at <= datetime.now(timezone.utc) and date == query["X-Amz-Date"][:8]
        signature = query["X-Amz-Signature"]
        assert signature == sigv4_query_signature(url, method, s3_server.secret_key)
        assert signature != sigv4_query_signature(url, other, s3_server.secret_key)
        other_path = (
            f"/{s3_server.bucket}/{s3_store.prefix}/experiments/e1/rounds/0/updates/site-b.safetensors"
        )
        assert signature != sigv4_query_signature(url, method, s3_server.secret_key, path=other_path)

    response = requests.get(get_url, timeout=10)
    assert response.status_code == 200 and response.content == b"global model"
    response = requests.put(put_url, data=b"site a delta", timeout=10)
    assert response.status_code == 200
    assert s3_store.get_bytes(update_key) == b"site a delta"


def test_default_expiry_is_short(s3_store: S3Store) -> None:
    assert url_query(s3_store.presign_get(KEY))["X-Amz-Expires"] == "900"


def test_expiry_is_bounded_to_seven_days(s3_store: S3Store) -> None:
    assert url_query(s3_store.presign_put(KEY, timedelta(days=7)))["X-Amz-Expires"] == "604800"
    for bad in (timedelta(days=7, seconds=1), 0, -5, timedelta(milliseconds=1500)):
        with pytest.raises(ValueError, match="expiry"):
            s3_store.presign_get(KEY, bad)


def test_anonymous_store_cannot_presign(s3_server: S3TestServer) -> None:
    store = S3Store(bucket=s3_server.bucket, endpoint=s3_server.endpoint_url)
    with pytest.raises(StoreError, match="no credentials"):
        store.presign_get(KEY)


def test_open_store_s3_url_and_hook_config(s3_server: S3TestServer) -> None:
    url = f"s3://{s3_server.bucket}/via/url?endpoint={s3_server.endpoint_url}&region={s3_server.region}"
    store = open_store(url, access_key=s3_server.access_key, secret_key=s3_server.secret_key)
    assert isinstance(store, S3Store) and store.prefix == "via/url"
    store.put_bytes("a.bin", b"via url")
    config = s3_server.store_config(prefix="via/url") | {"verify": True}
    assert open_store(**config).get_bytes("a.bin") == b"via url"
    assert store.uri("a.bin") == f"s3://{s3_server.bucket}/via/url/a.bin"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://ak:sk@bucket/x", "credentials"),
        ("s3:///x", "names no bucket"),
        ("s3://bucket/x?endpoint_url=http://h:1", "unknown store URL parameter"),
        ("s3://bucket/x?secure=maybe", "not a boolean"),
        ("s3://bucket/x?endpoint=https://h:1&secure=false", "contradicts"),
        ("s3://bucket/x?endpoint=http://h:1/path", "host\\[:port\\]"),
    ],
)
def test_open_store_refuses_bad_s3_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_store(url)


def test_split_endpoint() -> None:
    assert split_endpoint("http://127.0.0.1:9000/", None) == ("127.0.0.1:9000", False)
    assert split_endpoint("minio.example:9000", None) == ("minio.example:9000", True)
    assert split_endpoint("minio.example:9000", False) == ("minio.example:9000", False)
    assert split_endpoint(None, None) == ("s3.amazonaws.com", True)
