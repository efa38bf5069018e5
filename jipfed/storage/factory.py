"""``open_store``: a ModelStore from a URL, a path, or keyword settings.

Accepted forms::

    open_store("/data/store")                       # LocalFolderStore (also "file:///data/store")
    open_store("s3://bucket/some/prefix?endpoint=http://127.0.0.1:9000&region=us-east-1",
               access_key="...", secret_key="...")
    open_store(kind="local", root="/data/store")
    open_store(kind="s3", bucket="jipfed", endpoint_url="http://127.0.0.1:9000", region=None,
               access_key="...", secret_key="...", verify=True)   # ModelStoreHook's config

Credentials are never read from a URL or the environment; pass them as keywords.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from jipfed.storage.base import ModelStore
from jipfed.storage.local import LocalFolderStore
from jipfed.storage.s3 import S3Store

_S3_QUERY_KEYS = ("endpoint", "region", "secure")
_BOOL_TEXT = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_s3_url(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError("do not put credentials in the store URL; pass access_key= and secret_key=")
    if not parts.hostname:
        raise ValueError(f"store URL {url!r} names no bucket (expected s3://bucket/prefix?...)")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - set(_S3_QUERY_KEYS))
    if unknown:
        raise ValueError(f"unknown store URL parameter(s) {unknown}; known: {list(_S3_QUERY_KEYS)}")
    settings: dict[str, Any] = {"bucket": parts.netloc, "prefix": unquote(parts.path).strip("/")}
    for name in _S3_QUERY_KEYS:
        if name in query:
            if len(query[name]) != 1:
                raise ValueError(f"store URL parameter {name!r} given more than once")
            settings[name] = query[name][0]
    if "secure" in settings:
        text = settings["secure"].lower()
        if text not in _BOOL_TEXT:
            raise ValueError(f"store URL parameter secure={settings['secure']!r} is not a boolean")
        settings["secure"] = _BOOL_TEXT[text]
    return settings


def open_store(
    url_or_path: str | os.PathLike[str] | None = None,
    *,
    kind: str | None = None,
    root: str | os.PathLike[str] | None = None,
    bucket: str | None = None,
    prefix: str = "",
    endpoint_url: str | None = None,
    region: str | None = None,
    secure: bool | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    verify: bool | str = True,
    part_size: int = 0,
) -> ModelStore:
    """Open a model store; see the module docstring for the accepted forms.

    Args:
        url_or_path: ``s3://bucket/prefix?endpoint=...&region=...&secure=...``, ``file://``
            URL or a folder path. Mutually exclusive with ``kind``.
        kind: ``"local"`` (needs ``root``) or ``"s3"`` (needs ``bucket``).
        root: Folder of a local store.
        bucket, prefix, endpoint_url, region, secure, verify, part_size: see :class:`S3Store`
            (``region`` None = ``us-east-1``).
        access_key, secret_key: S3 credentials.
    """
    s3_settings: dict[str, Any] = {
        "bucket": bucket,
        "prefix": prefix,
        "endpoint": endpoint_url,
        "region": region,
        "secure": secure,
    }
    if url_or_path is not None:
        if kind is not None or root is not None or bucket is not None:
            raise ValueError("give either url_or_path or kind=/root=/bucket=, not both")
        text = os.fspath(url_or_path)
        if text.startswith("s3://"):
            kind = "s3"
            s3_settings.update(_parse_s3_url(text))
        elif "://" in text and not text.startswith("file://"):
            raise ValueError(f"unsupported store URL {text!r}: use s3://..., file://... or a path")
        else:
            kind, root = "local", unquote(urlsplit(text).path) if text.startswith("file://") else text
    if kind == "local":
        if not root:
            raise ValueError("a local store needs root=")
        if access_key or secret_key:
            raise ValueError("a local store takes no credentials")
        return LocalFolderStore(root)
    if kind == "s3":
        if not s3_settings["bucket"]:
            raise ValueError("an S3 store needs a bucket")
        return S3Store(
            access_key=access_key, secret_key=secret_key, verify=verify, part_size=part_size, **s3_settings
        )
    raise ValueError(f"unknown store kind {kind!r}; use 'local' or 's3' (or pass a URL or path)")
