"""Image URLs of requests to images, within the server's limits.

`data:` URLs (base64) are always accepted. Remote http(s) URLs and local files are refused unless the
server was started with `--allow-remote-images` or `--allow-local-images DIR`; then downloads are
capped in bytes and in total time, and files must lie inside DIR. Every image is decoded with the
same pixel limit, checked from the header before decoding.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from crossvlm.inference import InputError, open_image

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclass
class ImagePolicy:
    """What the server fetches and how much."""

    max_pixels: int = 16_000_000
    """Largest width × height accepted (about 4000 × 4000)."""
    max_bytes: int = 20_000_000
    """Largest encoded image, from any source."""
    allow_remote: bool = False
    """Fetch http(s) URLs (the server then makes requests its clients choose: only on trusted networks)."""
    remote_timeout: float = 10.0
    """Seconds a download may take in all."""
    local_root: Path | None = None
    """Folder whose files may be named by `file://` URLs or plain paths; None refuses local files."""


def image_from_url(url: str, policy: ImagePolicy, param: str, draft_size: int | None = None):
    """Decode the image an `image_url` names (a JPEG at `draft_size`, as training decodes it: see
    `open_image`); raises `InputError` (400) for anything refused."""
    return open_image(_image_bytes(url.strip(), policy, param), policy.max_pixels, param, draft_size)


def _image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _from_data_url(url, policy, param)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise InputError("remote image URLs are disabled on this server: send the image as a base64 "
                             "data: URL, or start the server with --allow-remote-images", "remote_images_disabled",
                             param)
        return _download(url, policy, param)
    if scheme in ("file", "") or len(scheme) == 1:  # a path, file:// URL or a Windows drive letter
        if policy.local_root is None:
            raise InputError("local image files are disabled on this server: send the image as a base64 "
                             "data: URL, or start the server with --allow-local-images DIR", "local_images_disabled",
                             param)
        return _read_local(url, policy, param)
    raise InputError(f"unsupported image URL scheme {scheme!r}: use a data: URL", "invalid_image_url", param)


def _from_data_url(url: str, policy: ImagePolicy, param: str) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None or ";base64" not in match["params"].lower():
        raise InputError("an image data URL must look like data:image/png;base64,<data>", "invalid_image_url", param)
    data = match["data"].strip()
    if len(data) * 3 // 4 > policy.max_bytes:
        raise InputError(f"image is larger than {policy.max_bytes} bytes", "image_too_large", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image data is not valid base64", "invalid_base64", param) from None


def _download(url: str, policy: ImagePolicy, param: str) -> bytes:
    deadline = time.monotonic() + policy.remote_timeout
    request = urllib.request.Request(url, headers={"User-Agent": "crossvlm"})
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(request, timeout=policy.remote_timeout) as response:
            while chunk := response.read(65536):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise InputError(f"image at {url} is larger than {policy.max_bytes} bytes", "image_too_large", param)
                if time.monotonic() > deadline:
                    raise InputError(f"downloading {url} took longer than {policy.remote_timeout} s",
                                     "image_fetch_timeout", param)
                chunks.append(chunk)
    except InputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL
        if isinstance(getattr(err, "reason", err), TimeoutError) or isinstance(err, TimeoutError):
            raise InputError(f"downloading {url} took longer than {policy.remote_timeout} s",
                             "image_fetch_timeout", param) from None
        raise InputError(f"cannot download {url}: {err}", "image_fetch_failed", param) from None
    return b"".join(chunks)


def _read_local(url: str, policy: ImagePolicy, param: str) -> bytes:
    path = Path(url.removeprefix("file://")).expanduser()
    root = policy.local_root.resolve()
    path = (root / path).resolve()  # a relative path is relative to the root; an absolute one stays
    if not path.is_relative_to(root):
        raise InputError(f"image path {url} is outside the folder this server may read", "local_image_refused", param)
    if not path.is_file():
        raise InputError(f"image file {url} does not exist", "invalid_image", param)
    if path.stat().st_size > policy.max_bytes:
        raise InputError(f"image file {url} is larger than {policy.max_bytes} bytes", "image_too_large", param)
    return path.read_bytes()
