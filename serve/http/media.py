"""Images from `image_url` parts: base64 data URLs always, local files only under an allowed directory.

The server fetches nothing: http(s) URLs are refused with a 400 that says so. An image that does not decode
is a 400 naming the part, found here before the request reaches the engine.
"""

from __future__ import annotations

import base64
import binascii
import io
import pathlib
import urllib.parse

from PIL import Image, UnidentifiedImageError

from serve.http.errors import APIError


def load_image(url: str, *, param: str, allowed_local_media_path: pathlib.Path | None) -> Image.Image:
    """The image a part's URL names, decoded (`param` says which part, for the error message)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url_bytes(url, param)
    elif scheme in ("http", "https"):
        raise APIError(f"{param}: the server fetches nothing from the network; send the image as a base64 "
                       "data URL (data:image/png;base64,...)", param=param)
    elif scheme in ("file", ""):
        data = _local_file_bytes(url, param, allowed_local_media_path)
    else:
        raise APIError(f"{param}: unsupported URL scheme {scheme!r}; use a base64 data URL", param=param)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise APIError(f"{param}: the image does not decode ({exc})", param=param) from None
    return image


def _data_url_bytes(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(f"{param}: a data URL must be data:<mime type>;base64,<data>", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(f"{param}: the data URL's payload is not valid base64", param=param) from None


def _local_file_bytes(url: str, param: str, allowed: pathlib.Path | None) -> bytes:
    if allowed is None:
        raise APIError(f"{param}: local image paths are disabled; start the server with "
                       "--allowed-local-media-path DIR to allow files under DIR, or send a data URL",
                       param=param)
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    path = pathlib.Path(raw).resolve()
    if not path.is_relative_to(allowed):
        raise APIError(f"{param}: {raw} is outside the allowed media directory {allowed}", param=param)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise APIError(f"{param}: cannot read {raw}: {exc.strerror}", param=param) from None
