"""A streamed upload's form is bounded besides its file (its parts, their headers), and a
file whose header is no safetensors header is a 4xx, whatever JSON it holds."""

from __future__ import annotations

import struct

from app.uploads import MAX_PARTS


def form(parts: list[tuple[str, bytes]], boundary: str = "lethe-b") -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
                    .encode() + (b'; filename="f.safetensors"' if name == "file" else b"")
                    + b"\r\n\r\n" + value + b"\r\n" for name, value in parts)
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_form_of_too_many_parts_is_413_before_it_is_read_whole(client):
    body, headers = form([(f"x{i}", b"1") for i in range(10 * MAX_PARTS)]
                         + [("file", b"0" * 16)])
    r = client.post("/models", content=body, headers=headers)
    assert r.status_code == 413 and f"at most {MAX_PARTS} parts" in r.json()["error"]["message"]


def test_a_part_with_headers_past_the_bound_is_refused(client):
    boundary = "lethe-b"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"id\"\r\n"
            f"X-Pad: {'a' * 100_000}\r\n\r\nm\r\n--{boundary}--\r\n").encode()
    r = client.post("/models", content=body,
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422, r.text  # python-multipart's own header bound
    assert "Maximum header size exceeded" in r.json()["error"]["message"]


def test_a_deeply_nested_header_is_422_not_a_crash(client):
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    data = struct.pack("<Q", len(nested)) + nested
    body, headers = form([("id", b"deep"), ("file", data)])
    r = client.post("/models", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert "nests too deeply" in r.json()["error"]["message"]
