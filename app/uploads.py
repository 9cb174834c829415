"""Large multipart uploads streamed straight to disk, under a size limit.

Starlette's form parser spools each file to a temporary file of its own choosing with no
size bound; a checkpoint of several gigabytes must land where the worker will read it and
be cut off the moment it passes the limit, so the body is parsed here as it arrives
(python-multipart's streaming parser, the one Starlette itself uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import InvalidParams, TooLarge, UnsupportedMedia, shown

MAX_FIELD_BYTES = 4096  # a text field (an id, an option): anything longer is not one
# A form is the file and a few options, each kept in memory: their number is bounded too
# (a part's headers are, by python-multipart itself).
MAX_PARTS = 16
# What a form may hold besides its file (fields, part headers, boundaries), for a check of
# the declared length before anything is read.
MAX_FORM_BYTES = MAX_PARTS * (MAX_FIELD_BYTES + 1024)


@dataclass
class Received:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # as the client named the file part
    size: int = 0


async def receive_file(request: Request, file_field: str, dest: Path, max_bytes: int,
                       on_field=None, limit_name: str = "LETHE_MAX_UPLOAD_BYTES") -> Received:
    """Parse ``request``'s multipart body: part ``file_field`` is written to ``dest`` (at
    most ``max_bytes``, else TooLarge naming ``limit_name``), the other parts are returned
    as text fields.

    ``on_field(name, value)`` runs as each text field completes, so a bad field sent before
    the file (an id that exists) is refused before gigabytes are read.
    """
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in options:
        raise UnsupportedMedia(
            f"`Content-Type` must be multipart/form-data with a `{file_field}` file part, "
            f"got {shown(request.headers.get('content-type', ''))}")
    got = Received()
    state: dict = {"headers": {}, "name": None, "sink": None, "text": bytearray(),
                   "header_field": b"", "header_value": b""}
    out: IO[bytes] | None = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        nonlocal out
        state["parts"] = state.get("parts", 0) + 1
        if state["parts"] > MAX_PARTS:
            raise TooLarge(f"the form must have at most {MAX_PARTS} parts (the `{file_field}` "
                           "and its options)")
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        state["name"], state["text"] = name, bytearray()
        if name == file_field:
            if out is not None:
                raise InvalidParams(f"`{file_field}` was sent twice; send one file")
            got.filename = disposition.get(b"filename", b"").decode("utf-8", "replace") or None
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = open(dest, "wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["name"] == file_field:
            got.size += len(chunk)
            if got.size > max_bytes:
                raise TooLarge(f"`{file_field}` must be at most {max_bytes} bytes "
                               f"({limit_name}); got {got.size} or more")
            assert out is not None
            out.write(chunk)
        else:
            state["text"] += chunk
            if len(state["text"]) > MAX_FIELD_BYTES:
                raise InvalidParams(f"`{state['name']}` must be at most {MAX_FIELD_BYTES} "
                                    "bytes")

    def on_part_end() -> None:
        name = state["name"]
        if name != file_field and name:
            value = state["text"].decode("utf-8", "replace")
            got.fields[name] = value
            if on_field is not None:
                on_field(name, value)
        state["headers"] = {}

    parser = MultipartParser(options[b"boundary"], {
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidParams(f"the multipart body is malformed: {exc}") from None
    finally:
        if out is not None:
            out.close()
    if out is None:
        raise InvalidParams(f"`{file_field}` is required: send the checkpoint as a file part")
    return got
