"""Images and documents in the gateway's own sessions (docs/attachments.md).

Every transport turns what a client attached into ``FilePart``s (``from_data_url``, ``from_base64``, or a URL
part that ``fetch`` downloads when ``[chat] fetch_urls`` allows it); ``prepare`` checks them against
``[attachments]`` and the model before anything is stored or sent, and ``keep`` puts their bytes in the blob
store (``storage/embedded/blobs.py``) by SHA-256. Stored messages hold the parts without their data; ``load`` puts the bytes
back into the parts of a call. ``tokens`` estimates what a file costs a call: the inspector's
``attachments`` section and the reservation of every call that sends it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ApiError
from .prompt_cache import anthropic_family
from .types import ChatMessage, FilePart

if TYPE_CHECKING:
    from .registry import Registry

# Anthropic's documented image cost: (width * height) / 750 tokens, after the image is scaled to fit
# 1568 px on its long side and about 1.15 megapixels: so at most about 1,600 tokens, what a reservation counts
# for any image (calls.py, the /v1 bodies too).
IMAGE_TOKENS = 1600
IMAGE_TOKEN_PIXELS = 750
IMAGE_MAX_EDGE = 1568
# A PDF page: its text (Anthropic: 1,500 to 3,000 tokens) at the upper figure, plus the page as an image.
PDF_PAGE_TOKENS = 3000 + IMAGE_TOKENS
# OpenAI's models bill an image by their own formulas (platform.openai.com/docs/guides/images-vision, "Calculating
# costs"), some far above Anthropic's. The tile-based ones, (base, a tile's tokens): at "high" detail (what "auto", the
# gateway sending none, may choose) the image is scaled to fit 2048 x 2048 and then 768 px on its short side, and
# billed base + a tile's tokens for each 512-px tile, so at most 8 tiles (768 x 2048). The patch-based ones, a
# multiplier: the 32-px patches covering the image, at most 1536 (a larger image is scaled down to fit), times the
# multiplier. By model name prefix, the longest first.
OPENAI_IMAGE_FORMULAS: tuple[tuple[str, tuple[int, int] | float], ...] = (
    ("gpt-4o-mini", (2833, 5667)),
    ("gpt-4.1-nano", 2.46),
    ("gpt-5-nano", 2.46),
    ("gpt-4.1-mini", 1.62),
    ("gpt-5-mini", 1.62),
    ("o4-mini", 1.72),
    ("gpt-4o", (85, 170)),
    ("gpt-4.1", (85, 170)),
    ("gpt-4.5", (85, 170)),
    ("gpt-5", (70, 140)),
    ("o1", (75, 150)),
    ("o3", (75, 150)),
    ("computer-use-preview", (65, 129)),
)
OPENAI_MAX_TILES = 8
OPENAI_MAX_PATCHES = 1536


def openai_image_formula(model: str) -> tuple[int, int] | float | None:
    """``model``'s entry of ``OPENAI_IMAGE_FORMULAS`` (None: not an OpenAI model that reads images)."""
    name = model.rsplit("/", 1)[-1]
    return next((formula for prefix, formula in OPENAI_IMAGE_FORMULAS if name.startswith(prefix)), None)


def _openai_image_tokens(formula: tuple[int, int] | float, size: tuple[int, int] | None) -> int:
    """An image of ``size`` (None: unread, so its most) by one of ``OPENAI_IMAGE_FORMULAS``."""
    if isinstance(formula, tuple):
        base, tile = formula
        if size is None:
            return base + OPENAI_MAX_TILES * tile
        fit = min(1.0, 2048 / max(size))
        w, h = size[0] * fit, size[1] * fit
        short = min(1.0, 768 / min(w, h))
        return base + tile * _covering(w * short, 512) * _covering(h * short, 512)
    if size is None:
        return round(OPENAI_MAX_PATCHES * formula)
    w, h = float(size[0]), float(size[1])
    if _covering(w, 32) * _covering(h, 32) > OPENAI_MAX_PATCHES:
        shrink = math.sqrt(32 * 32 * OPENAI_MAX_PATCHES / (w * h))
        # then down to whole patches on the side that fits fewer
        shrink *= min(math.floor(w * shrink / 32) / (w * shrink / 32), math.floor(h * shrink / 32) / (h * shrink / 32))
        w, h = w * shrink, h * shrink
    return round(min(OPENAI_MAX_PATCHES, _covering(w, 32) * _covering(h, 32)) * formula)


def _covering(length: float, unit: int) -> int:
    """The units of ``unit`` pixels covering ``length`` (a scaled length's float error is not a unit more)."""
    return max(1, math.ceil(round(length / unit, 6)))


# Claude models that read images at a higher resolution than ``IMAGE_TOKENS`` allows: Opus 4.7 takes up to 3.75
# megapixels (2576 px on the long side), (3,750,000 / 750) tokens an image. By name, wherever it is served.
ANTHROPIC_HIGH_RES_IMAGE_TOKENS = (("claude-opus-4-7", 3_750_000 // IMAGE_TOKEN_PIXELS),)
ANTHROPIC_HIGH_RES_MAX_EDGE = 2576


def image_reading(model: str) -> tuple[int, int]:
    """(the long side an image is scaled to fit, the most tokens it then costs) when ``model`` reads it:
    Anthropic's formula, at a higher resolution for the models of ``ANTHROPIC_HIGH_RES_IMAGE_TOKENS``."""
    name = model.rsplit("/", 1)[-1]
    for pattern, tokens in ANTHROPIC_HIGH_RES_IMAGE_TOKENS:
        if pattern in name:
            return ANTHROPIC_HIGH_RES_MAX_EDGE, tokens
    return IMAGE_MAX_EDGE, IMAGE_TOKENS


def image_ceiling(model: str) -> int:
    """The most one image may cost ``model`` in input tokens: Anthropic's ceiling, or more where the model reads
    images at a higher resolution (``ANTHROPIC_HIGH_RES_IMAGE_TOKENS``) or its provider bills images at more
    (``OPENAI_IMAGE_FORMULAS``)."""
    read = image_reading(model)[1]
    if read > IMAGE_TOKENS:
        return read
    formula = openai_image_formula(model)
    return IMAGE_TOKENS if formula is None else max(IMAGE_TOKENS, _openai_image_tokens(formula, None))


# Files larger than this are encoded and decoded on a worker thread: the event loop keeps serving.
OFF_LOOP_BYTES = 1024 * 1024
T = TypeVar("T")


async def _sized(size: int, work: Callable[[], T]) -> T:
    """``work()``, on a worker thread when it handles more than ``OFF_LOOP_BYTES``."""
    return await asyncio.to_thread(work) if size > OFF_LOOP_BYTES else work()


async def b64encode(raw: bytes) -> str:
    return await _sized(len(raw), lambda: base64.b64encode(raw).decode("ascii"))


async def data_url(media_type: str, raw: bytes) -> str:
    """``raw`` as a ``data:`` URL (a large one's copies made off the loop as well as its encoding)."""
    return await _sized(len(raw), lambda: f"data:{media_type};base64," + base64.b64encode(raw).decode("ascii"))


def json_with_data_urls(body: dict[str, Any]) -> list[bytes]:
    """``body`` (``{"session": ...}`` of ``with_urls``) as JSON, in pieces: the base64 of each large ``data:`` URL
    ``with_urls`` gave a stored file is a piece of its own, spliced in rather than JSON-encoded (base64 needs no
    escaping: a copy, where the encoder scans each character holding the GIL). One piece when there is none."""
    session = body.get("session")
    messages = session.get("messages") if isinstance(session, dict) else None
    if not isinstance(session, dict) or not isinstance(messages, list):
        return [json.dumps(body).encode()]
    token = secrets.token_hex(8)  # a placeholder no text of the session can hold
    urls: list[tuple[str, str]] = []

    def spliced(part: Any) -> Any:
        url = part.get("url") if isinstance(part, dict) and part.get("type") == "file" and part.get("sha256") else None
        if not isinstance(url, str) or len(url) <= OFF_LOOP_BYTES or not url.startswith("data:"):
            return part
        head, comma, data = url.partition(",")
        # isascii is O(1), ``in`` a memchr: what with_urls wrote is base64, checked as cheaply as that
        if not comma or not data.isascii() or '"' in data or "\\" in data:
            return part
        urls.append((head + comma, data))
        return {**part, "url": f"{token}-{len(urls) - 1}"}  # a copy: the stored part is left as it is

    shown = [
        {**m, "parts": [spliced(p) for p in m["parts"]]}
        if isinstance(m, dict) and isinstance(m.get("parts"), list)
        else m
        for m in messages
    ]
    text = json.dumps({**body, "session": {**session, "messages": shown}})
    out: list[bytes] = []
    for i, (head, data) in enumerate(urls):
        before, text = text.split(f'"{token}-{i}"', 1)
        out += [before.encode(), json.dumps(head).encode()[:-1], data.encode("ascii"), b'"']
    return [*out, text.encode()]


async def b64decode(data: str) -> bytes:
    return await _sized(len(data), lambda: base64.b64decode(data))


def _invalid(path: str, problem: str) -> ApiError:
    return ApiError("INVALID_MESSAGE", f"{path}: {problem}", {path: problem})


def _filename(filename: Any, path: str) -> str | None:
    """A file's name: a string, or none (an empty one is none)."""
    if filename is not None and not isinstance(filename, str):
        raise _invalid(f"{path}.filename", "must be a string")
    return filename or None


def from_bytes(media_type: str, raw: bytes, filename: str | None = None) -> FilePart:
    """A file part of these bytes, with its size and hash (the data base64-encoded, for the providers)."""
    return FilePart(
        media_type.lower(),
        data=base64.b64encode(raw).decode("ascii"),
        filename=filename,
        size=len(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def from_base64(media_type: Any, data: Any, filename: Any, path: str, field: str = "data") -> FilePart:
    """A file part of base64 ``data``; ``INVALID_MESSAGE`` naming ``path`` and the ``field`` the client sent
    the data in when it is not base64."""
    if not isinstance(media_type, str) or "/" not in media_type:
        raise _invalid(f"{path}.mediaType", "required: a media type such as image/png")
    if not isinstance(data, str) or not data:
        raise _invalid(f"{path}.{field}", "required: the file's bytes, base64-encoded")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{path}.{field}", "must be base64") from None
    name = _filename(filename, path)
    # The client's base64 (validated: nothing but the alphabet) is sent as it came, not encoded again.
    return FilePart(media_type.lower(), data=data, filename=name, size=len(raw), sha256=hashlib.sha256(raw).hexdigest())


def from_data_url(url: str, media_type: Any, filename: Any, path: str) -> FilePart:
    """A file part of a ``data:<type>;base64,<data>`` URL (the AI SDK's file parts)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise _invalid(f"{path}.url", "must be a data: URL with base64 data, or an http(s) URL")
    declared = head[5:-7] or None
    return from_base64(media_type if isinstance(media_type, str) else declared, data, filename, path, "url")


def from_url(url: Any, media_type: Any, filename: Any, path: str) -> FilePart:
    """A file part of a ``data:`` URL, or one whose http(s) URL ``fetch`` downloads later."""
    if not isinstance(url, str) or not url:
        raise _invalid(f"{path}.url", "required: a data: or http(s) URL")
    if url.startswith("data:"):
        return from_data_url(url, media_type, filename, path)
    if not url.startswith(("http://", "https://")):
        raise _invalid(f"{path}.url", "must be a data: URL with base64 data, or an http(s) URL")
    if not isinstance(media_type, str) or "/" not in media_type:
        raise _invalid(f"{path}.mediaType", "required: a media type such as image/png")
    return FilePart(media_type.lower(), url=url, filename=_filename(filename, path))


async def fetch(gw: Registry, part: FilePart) -> FilePart:
    """The file behind ``part.url``, downloaded within ``[attachments] max_file_bytes`` and
    ``fetch_timeout_seconds``; refused unless ``[chat] fetch_urls`` is on."""
    import aiohttp

    if not gw.config["chat"]["fetch_urls"]:
        raise ApiError(
            "INVALID_MESSAGE",
            "File parts with an http(s) URL are not fetched by this gateway ([chat] fetch_urls = false); "
            "send the file as a data: URL.",
        )
    limit = int(gw.config["attachments"]["max_file_bytes"])
    timeout = aiohttp.ClientTimeout(total=float(gw.config["attachments"]["fetch_timeout_seconds"]))
    assert part.url is not None
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(part.url, allow_redirects=True, max_redirects=3) as response,
        ):
            if response.status != 200:
                raise ApiError("INVALID_MESSAGE", f"Fetching the file {part.url!r} failed: HTTP {response.status}.")
            if response.content_length is not None and response.content_length > limit:
                raise _too_large(part, response.content_length, limit)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise _too_large(part, size, limit)
                chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError) as e:
        what = "did not finish in time" if isinstance(e, TimeoutError) else "failed"
        raise ApiError("INVALID_MESSAGE", f"Fetching the file {part.url!r} {what}.") from None
    raw = b"".join(chunks)
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(from_bytes, part.media_type, raw, part.filename)
    return from_bytes(part.media_type, raw, part.filename)


def _name(part: FilePart) -> str:
    return repr(part.filename) if part.filename else f"of type {part.media_type}"


def _too_large(part: FilePart, size: int, limit: int) -> ApiError:
    return ApiError(
        "PAYLOAD_TOO_LARGE",
        f"The file {_name(part)} is {size} bytes; the limit is {limit} bytes per file ([attachments] max_file_bytes).",
    )


# How the files of the default media types start: a mismatch is refused here rather than by the upstream.
SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
}


def looks_like(part: FilePart) -> bool:
    """Whether a part's bytes start as its media type's files do (True for types without a known signature)."""
    head = raw_bytes(FilePart(part.media_type, data=(part.data or "")[:24]))
    if part.media_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    signatures = SIGNATURES.get(part.media_type)
    return signatures is None or head.startswith(signatures)


def stored_files(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The file parts of stored messages."""
    return [p for m in messages for p in m.get("parts") or () if isinstance(p, dict) and p.get("type") == "file"]


def reads(gw: Registry, model: str, media_types: Collection[str]) -> bool:
    """Whether ``model`` reads all these media types (a fallback or a group's deployment that does not is
    skipped: it would be sent the session's files)."""
    if not media_types:
        return True
    try:
        check_model(gw, model, media_types)
    except ApiError:
        return False
    return True


def check_model(gw: Registry, model: str, media_types: Iterable[str]) -> None:
    """Refuse (before any call) a model that cannot read one of these media types: ``supports_vision`` and
    ``supports_pdf_input`` of the cost map or of the model's provider (``model_info``). A model group reads
    them when one of its deployments does (the turn calls only those)."""
    media_types = list(media_types)
    group = gw.router.group(model)
    if group is not None and any(reads(gw, d.model, media_types) for d in group.deployments):
        return
    info = gw.model_info(model) if group is None else gw.model_info(group.deployments[0].model)
    for media_type in sorted(set(media_types)):
        if media_type.startswith("image/") and not info.supports_vision:
            raise ApiError(
                "INVALID_MESSAGE",
                f"The model {model!r} does not take images ({media_type}); choose a model with vision.",
            )
        if media_type == "application/pdf" and not info.supports_pdf_input:
            raise ApiError("INVALID_MESSAGE", f"The model {model!r} does not take PDF documents; choose another model.")


# Anthropic's limits on an image (docs.anthropic.com, "Vision"): at most 5 MB of base64 (5,242,880 characters,
# about 3.75 MiB of image) and 8000 px on a side. The API refuses a larger one, and a session holding it would
# fail on every later turn (the image is resent): refused here, before it is stored. For Claude wherever it is
# served (Bedrock, Vertex: the same model and limits).
ANTHROPIC_IMAGE_BASE64_BYTES = 5 * 1024 * 1024
ANTHROPIC_IMAGE_MAX_EDGE = 8000
# The most a Messages API request may be (32 MB); the files a call sends, as base64, must fit in it with room for
# the rest of the request.
ANTHROPIC_REQUEST_FILE_BYTES = 32_000_000 - 1024 * 1024


def _base64_size(size: int) -> int:
    return 4 * -(-size // 3)


def check_model_limits(model: str, new: Sequence[FilePart], earlier: Iterable[dict[str, Any]]) -> None:
    """Refuse an image over Anthropic's limits for a Claude model: the new files by size and dimensions, the
    earlier ones a call resends by size (they were measured when the model that took them was another)."""
    if not anthropic_family(model):
        return
    sizes = [(_name(p), p.size or 0) for p in new if p.is_image]
    sizes += [
        (repr(p["filename"]) if p.get("filename") else f"of type {p.get('mediaType')}", int(p.get("size") or 0))
        for p in earlier
        if str(p.get("mediaType")).startswith("image/")
    ]
    for name, size in sizes:
        if _base64_size(size) > ANTHROPIC_IMAGE_BASE64_BYTES:
            raise ApiError(
                "PAYLOAD_TOO_LARGE",
                f"The image {name} is {size} bytes, {_base64_size(size)} as base64; {model!r} takes at most "
                f"{ANTHROPIC_IMAGE_BASE64_BYTES} bytes of base64 an image (about 3.75 MiB).",
            )
    total = sum(_base64_size(p.size or 0) for p in new) + sum(_base64_size(int(p.get("size") or 0)) for p in earlier)
    if total > ANTHROPIC_REQUEST_FILE_BYTES:
        raise ApiError(
            "PAYLOAD_TOO_LARGE",
            f"A call of this session would send {total} bytes of files as base64; {model!r} "
            f"takes requests of at most 32 MB (each turn resends the session's files). Start a new session, or "
            "compact this one first.",
        )
    for part in new:
        if part.is_image and (dims := image_size(raw_bytes(part))) is not None and max(dims) > ANTHROPIC_IMAGE_MAX_EDGE:
            raise ApiError(
                "INVALID_MESSAGE",
                f"The image {_name(part)} is {dims[0]} x {dims[1]} pixels; {model!r} takes at most "
                f"{ANTHROPIC_IMAGE_MAX_EDGE} pixels on a side.",
            )


# With more than 20 images in a request, Claude takes at most 2000 px on a side of each (the same "Vision" page):
# a session's 21st image would make every later call, which resends them all, fail when any is larger.
ANTHROPIC_MANY_IMAGES = 20
ANTHROPIC_MANY_IMAGES_MAX_EDGE = 2000
# The sizes of stored images by SHA-256: each turn of a session of many images checks them all.
_DIMENSIONS: dict[str, tuple[int, int] | None] = {}


async def check_many_images(
    gw: Registry, model: str, new: Sequence[FilePart], earlier: Iterable[dict[str, Any]]
) -> None:
    """Refuse, for a Claude model, a call of more than 20 images one of which is over 2000 px on a side."""
    if not anthropic_family(model):
        return
    images = [p for p in new if p.is_image]
    stored = [p for p in earlier if str(p.get("mediaType")).startswith("image/") and p.get("sha256")]
    count = len(images) + len(stored)
    if count <= ANTHROPIC_MANY_IMAGES:
        return
    sized = [(_name(p), image_size(raw_bytes(p))) for p in images]
    for p in stored:
        sha256 = str(p["sha256"])
        if sha256 not in _DIMENSIONS:
            # An earlier message a new session imports (``/api/chat``) brings its data; a stored one's is in the blobs.
            data = p.get("data")
            raw = raw_bytes(FilePart(str(p["mediaType"]), data=data)) if data else await gw.blobs.get(sha256)
            if len(_DIMENSIONS) >= _MEASURED_MAX:
                _DIMENSIONS.clear()
            _DIMENSIONS[sha256] = image_size(raw) if raw else None
        sized.append(
            (repr(p["filename"]) if p.get("filename") else f"of type {p.get('mediaType')}", _DIMENSIONS[sha256])
        )
    for name, dims in sized:
        if dims is not None and max(dims) > ANTHROPIC_MANY_IMAGES_MAX_EDGE:
            raise ApiError(
                "INVALID_MESSAGE",
                f"The image {name} is {dims[0]} x {dims[1]} pixels; {model!r} takes at most "
                f"{ANTHROPIC_MANY_IMAGES_MAX_EDGE} pixels on a side when a call sends more than "
                f"{ANTHROPIC_MANY_IMAGES} images, and a call of this session would send {count} (each turn resends "
                "the session's images). Send smaller images, start a new session, or compact this one first.",
            )


async def prepare(
    gw: Registry,
    model: str,
    earlier: Sequence[dict[str, Any]],
    files: Sequence[FilePart],
    *,
    check: bool = True,
    resent: Sequence[dict[str, Any]] | None = None,
) -> list[FilePart]:
    """The files a user message attaches, checked against ``[attachments]`` and the model (which must also read
    the earlier files a call resends: ``resent``, those of the history after its latest summary, else all of
    ``earlier``, the session's file parts, ``stored_files``), URLs fetched. Raises ``ApiError``; nothing is kept
    yet."""
    again = earlier if resent is None else resent
    if check and again:
        check_model(gw, model, [str(p.get("mediaType")) for p in again])
    if not files:
        if check:
            check_model_limits(model, [], again)
            await check_many_images(gw, model, [], again)
        return []
    settings = gw.config["attachments"]
    allowed = [str(t).lower() for t in settings["media_types"]]
    per_file = int(settings["max_file_bytes"])
    ready: list[FilePart] = []
    for part in files:
        if part.media_type not in allowed:
            raise ApiError(
                "UNSUPPORTED_MEDIA_TYPE",
                f"The file {_name(part)} has media type {part.media_type!r}; this gateway takes "
                f"{', '.join(allowed) or 'no files'} ([attachments] media_types).",
            )
        if (part.size or 0) > per_file:
            raise _too_large(part, part.size or 0, per_file)
    if check:
        check_model(gw, model, [p.media_type for p in files])
    for part in files:
        ready.append(await fetch(gw, part) if part.url is not None and part.data is None else part)
    for part in ready:
        if not looks_like(part):
            raise ApiError(
                "INVALID_MESSAGE", f"The file {_name(part)} is not {part.media_type}: its bytes do not start as one."
            )
    if check:
        check_model_limits(model, ready, again)
        await check_many_images(gw, model, ready, again)
    _check_session_bytes(gw, sum(int(p.get("size") or 0) for p in earlier) + sum(p.size or 0 for p in ready))
    return ready


def _check_session_bytes(gw: Registry, total: int) -> None:
    limit = int(gw.config["attachments"]["max_session_bytes"])
    if total > limit:
        raise ApiError(
            "PAYLOAD_TOO_LARGE",
            f"The session's files would take {total} bytes; the limit is {limit} bytes per session "
            "([attachments] max_session_bytes).",
        )


async def keep(gw: Registry, session_id: str, files: Sequence[FilePart]) -> list[dict[str, Any]]:
    """Keep the bytes of ``prepare``d files for ``session_id`` in the blob store; their parts as stored."""
    stored = []
    for part in files:
        assert part.sha256 is not None and part.data is not None
        await gw.blobs.put(part.sha256, await b64decode(part.data), session_id)
        stored.append(stored_part(part))
    return stored


def imported_part(part: FilePart) -> dict[str, Any]:
    """A file of an earlier message a client sent for a new session (``/api/chat``): stored form with its
    data (or its URL), which ``keep_imported`` moves into the blob store."""
    if part.data is None:
        return {"type": "file", "mediaType": part.media_type, "url": part.url, "filename": part.filename}
    return {**stored_part(part), "data": part.data}


async def prepare_imported(
    gw: Registry, messages: Sequence[dict[str, Any]], files: Sequence[FilePart]
) -> list[tuple[dict[str, Any], list[FilePart]]]:
    """Imported messages, each with its files checked as ``prepare`` does (URLs fetched), and all of them with
    the new message's ``files`` within ``max_session_bytes``: refused here, before anything is kept."""
    out: list[tuple[dict[str, Any], list[FilePart]]] = []
    for message in messages:
        parts = [
            FilePart(
                str(p["mediaType"]),
                data=p.get("data"),
                url=p.get("url"),
                filename=p.get("filename"),
                size=p.get("size"),
                sha256=p.get("sha256"),
            )
            for p in message.get("parts") or ()
            if p.get("type") == "file"
        ]
        out.append((message, await prepare(gw, "", [], parts, check=False) if parts else []))
    # Sizes of fetched URLs are known only now.
    _check_session_bytes(gw, sum(p.size or 0 for _, ready in out for p in ready) + sum(p.size or 0 for p in files))
    return out


async def keep_imported(
    gw: Registry, session_id: str, prepared: Sequence[tuple[dict[str, Any], list[FilePart]]]
) -> list[dict[str, Any]]:
    """``prepare_imported``'s messages with their files' bytes in the blob store, as stored."""
    out = []
    for message, files in prepared:
        if not files:
            out.append(message)
            continue
        parts = [p for p in message["parts"] if p.get("type") != "file"]
        parts += await keep(gw, session_id, files)
        out.append({**message, "parts": parts})
    return out


def stored_part(part: FilePart) -> dict[str, Any]:
    """A file part as a session stores it: no data."""
    out: dict[str, Any] = {"type": "file", "mediaType": part.media_type}
    if part.filename:
        out["filename"] = part.filename
    out["size"] = part.size
    out["sha256"] = part.sha256
    return out


# The base64 of recently sent files, by SHA-256 (content-addressed, so never stale): every call of a session
# resends its earlier files, and reading and encoding them again cost about 2.5 ms per MiB per call.
ENCODED_CACHE_BYTES = 64 * 1024 * 1024
_encoded: OrderedDict[str, str] = OrderedDict()
_encoded_bytes = 0


def _remember(sha256: str, data: str) -> None:
    global _encoded_bytes
    if len(data) > ENCODED_CACHE_BYTES // 4:
        return  # a file this large would push out every other
    _encoded[sha256] = data
    _encoded_bytes += len(data)
    while _encoded_bytes > ENCODED_CACHE_BYTES:
        _, old = _encoded.popitem(last=False)
        _encoded_bytes -= len(old)


async def load(gw: Registry, messages: Iterable[ChatMessage]) -> None:
    """Put the bytes back into the file parts a call sends (each blob read and encoded once while it is
    among the recently sent)."""
    for message in messages:
        for part in message.parts:
            if isinstance(part, FilePart) and part.data is None and part.url is None and part.sha256:
                data = _encoded.get(part.sha256)
                if data is None:
                    raw = await gw.blobs.get(part.sha256)
                    if raw is None:
                        raise ApiError(
                            "STORAGE_ERROR", f"The file {_name(part)} of this session is missing from the blob store."
                        )
                    data = await b64encode(raw)
                    _remember(part.sha256, data)
                else:
                    _encoded.move_to_end(part.sha256)
                part.data = data


async def with_urls(gw: Registry, session: dict[str, Any]) -> dict[str, Any]:
    """A stored session whose file parts carry their bytes as ``url`` (a ``data:`` URL), as the AI SDK's
    file parts do: what ``GET /api/sessions/{id}`` returns, so a reloaded chat shows the files."""
    messages = session.get("messages")
    if not isinstance(messages, list) or not stored_files(messages):
        return session
    out = []
    for message in messages:
        parts = message.get("parts") or []
        if not any(isinstance(p, dict) and p.get("type") == "file" and p.get("sha256") for p in parts):
            out.append(message)
            continue
        new_parts = []
        for p in parts:
            if isinstance(p, dict) and p.get("type") == "file" and p.get("sha256") and not p.get("url"):
                raw = await gw.blobs.get(str(p["sha256"]))
                if raw is not None:
                    p = {**p, "url": await data_url(str(p.get("mediaType")), raw)}
            new_parts.append(p)
        out.append({**message, "parts": new_parts})
    return {**session, "messages": out}


# --- token estimates -------------------------------------------------------------------------------


def image_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, JPEG or WebP image from its header, None when it cannot be read."""
    try:
        if raw[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", raw[16:24])
        if raw[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", raw[6:10])
        if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
            kind = raw[12:16]
            if kind == b"VP8 ":
                w, h = struct.unpack("<HH", raw[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if kind == b"VP8L":
                bits = int.from_bytes(raw[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if kind == b"VP8X":
                return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
        if raw[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(raw):
                if raw[i] != 0xFF:
                    return None
                marker = raw[i + 1]
                length = struct.unpack(">H", raw[i + 2 : i + 4])[0]
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", raw[i + 5 : i + 9])
                    return w, h
                i += 2 + length
    except struct.error:
        return None
    return None


def image_tokens(raw: bytes, model: str = "") -> int:
    """What an image costs ``model``: OpenAI's formula for its models (``OPENAI_IMAGE_FORMULAS``), else Anthropic's,
    (width * height) / 750 after scaling to the long-edge and megapixel limits of the model reading it
    (``image_reading``: at most ``IMAGE_TOKENS`` for most); the formula's most when the size cannot be read."""
    size = image_size(raw)
    if size is not None and not (size[0] and size[1]):
        size = None
    formula = openai_image_formula(model)
    if formula is not None:
        return _openai_image_tokens(formula, size)
    edge, most = image_reading(model)
    if size is None:
        return most
    w, h = size
    scale = min(1.0, edge / max(w, h))
    return max(1, min(most, round(w * scale * h * scale / IMAGE_TOKEN_PIXELS)))


# A page object (``/Type /Page``, not ``/Pages``), and a page tree node's count of the pages under it.
_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PAGE_COUNT = re.compile(rb"/Type\s*/Pages\b[^>]*?/Count\s+(\d+)|/Count\s+(\d+)[^>]*?/Type\s*/Pages\b")
# An object stream (PDF 1.5 on: pdfTeX, Word, most producers now): the page objects are inside it, compressed.
_OBJECT_STREAM = re.compile(rb"/Type\s*/ObjStm\b.*?>>\s*stream\r?\n", re.S)
# The most pages a page tree's count is taken for: the count is the file's say, digits without end; a PDF of
# more pages than this is too big for any model, and a count of 400 digits would be no float once priced.
PDF_MAX_PAGES = 1_000_000
# What object streams are inflated to at most, in all (a PDF is a few MB; a compression bomb is not read).
OBJECT_STREAMS_MAX_BYTES = 64 * 1024 * 1024


def pdf_pages(raw: bytes) -> int:
    """The pages of a PDF (at least 1): the page objects, also those compressed in object streams, or the page
    tree's count, whichever is more -- a reservation must not take a long PDF for a page."""
    texts = [raw]
    left = OBJECT_STREAMS_MAX_BYTES
    for match in _OBJECT_STREAM.finditer(raw):
        if left <= 0:
            break
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(raw[match.end() : raw.find(b"endstream", match.end())], left)
        except zlib.error:
            continue  # not Flate-encoded (or damaged): its pages are not counted here
        left -= len(text)
        texts.append(text)
    objects = sum(len(_PAGE.findall(t)) for t in texts)
    counts = [_page_count(a or b) for t in texts for a, b in _PAGE_COUNT.findall(t)]
    return max(1, min(objects, PDF_MAX_PAGES), *counts)


def _page_count(digits: bytes) -> int:
    # Read at most 7 digits (int() of more than 4300 raises, and any more are more pages than the most).
    return PDF_MAX_PAGES if len(digits.lstrip(b"0")) > 6 else min(int(digits), PDF_MAX_PAGES)


def raw_bytes(part: FilePart) -> bytes:
    """The bytes of a part's base64 data (b'' when it has none)."""
    if not part.data:
        return b""
    try:
        return base64.b64decode(part.data)
    except (binascii.Error, ValueError):
        return b""


# What was measured of a file (image tokens or PDF pages) by SHA-256 and how an image is read (its formula, or the
# long side it is scaled to): a session's files are measured several times a turn (the policy, the reservation,
# the inspector), and decoding them each time would cost.
_MEASURED: dict[tuple[str, object], int] = {}
_MEASURED_MAX = 4096


def _measure(part: FilePart, model: str = "") -> int:
    """An image's tokens by the formula (as ``model`` reads it), or a PDF's pages."""
    reading = (openai_image_formula(model) or image_reading(model)[0]) if part.is_image else 0
    key = (part.sha256, reading) if part.sha256 else None
    if key is not None and key in _MEASURED:
        return _MEASURED[key]
    raw = raw_bytes(part)
    value = image_tokens(raw, model) if part.is_image else pdf_pages(raw)
    if key is not None and raw:
        if len(_MEASURED) >= _MEASURED_MAX:
            _MEASURED.clear()
        _MEASURED[key] = value
    return value


def pages(part: FilePart) -> int:
    """The pages of a PDF part."""
    return _measure(part)


def tokens(part: FilePart, *, ceiling: bool = False, model: str = "") -> int:
    """What a file costs a call to ``model``: images by its provider's formula (``image_tokens``), PDFs at
    ``PDF_PAGE_TOKENS`` a page. With ``ceiling`` (a reservation, whatever the provider) every image counts
    ``IMAGE_TOKENS``, and the reservation adds what a model may bill above it (``image_ceiling``): other providers
    bill small images more than Anthropic does (OpenAI at least 85 + 170 a tile, Gemini 258 an image)."""
    if part.is_image:
        return IMAGE_TOKENS if ceiling else _measure(part, model)
    return PDF_PAGE_TOKENS * _measure(part)
