"""Hostile input against a real `bentoml serve`: every case has its expected answer, none is a 5xx."""

from __future__ import annotations

import io
import select
import socket
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (PIL refuses to write 0-size images)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def photo(mode: str = "RGB", size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def multipart(name: str, data: bytes, kind: str = "application/octet-stream", field: str = "image") -> dict:
    return {"files": {field: (name, data, kind)}}


def raw(data: bytes, kind: str) -> dict:
    return {"content": data, "headers": {"Content-Type": kind}}


def corpus() -> list[tuple[str, str, dict, int, str]]:
    """(name, route, request, expected status, words the JSON error must contain)."""
    jpeg = encode(photo(), "JPEG", quality=90)
    png = encode(photo(), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [photo(size=(16, 16)), photo("L", (16, 16)).convert("RGB")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = Image.fromarray(np.linspace(0, 65535, 32 * 32, dtype=np.uint16).reshape(32, 32))
    cases = [
        ("empty raw body", "/classify", raw(b"", "image/jpeg"), 400, "empty"),
        ("empty file", "/classify", multipart("e.jpg", b"", "image/jpeg"), 400, "empty"),
        ("text body", "/classify", raw(b"hello", "text/plain"), 415, "Unsupported content type"),
        ("html body", "/classify", raw(b"<html><body>hi</body></html>", "text/html"), 415, "Unsupported"),
        ("json body", "/classify", raw(b'{"image": "x"}', "application/json"), 415, "Unsupported"),
        ("pdf file", "/classify", multipart("doc.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF", "application/pdf"),
         400, "not a readable image"),
        ("svg file", "/classify", multipart("v.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
         400, "not a readable image"),
        ("html file", "/classify", multipart("p.html", b"<!doctype html><p>x", "text/html"), 400, "not a readable"),
        ("garbage raw image", "/classify", raw(b"\x00\x01garbage" * 10, "image/png"), 400, "not a readable"),
        ("truncated jpeg", "/classify", multipart("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "t.jpg"),
        ("truncated png", "/classify", multipart("t.png", png[: len(png) // 2], "image/png"), 400, "t.png"),
        ("corrupt jpeg header", "/classify", multipart("h.jpg", b"\xff\xd8\xff\x00" + jpeg[4:40], "image/jpeg"),
         400, "h.jpg"),
        ("0-size png", "/classify", multipart("zero.png", png_with_size(0, 0), "image/png"), 400, "zero.png"),
        ("decompression bomb", "/classify",
         multipart("bomb.png", encode(Image.new("1", (20000, 20000)), "PNG"), "image/png"), 400, "over the limit"),
        ("missing field", "/classify", multipart("a.jpg", jpeg, "image/jpeg", field="file"), 400, "no file field"),
        ("multipart without boundary", "/classify", raw(b"--x\r\n", "multipart/form-data"), 400, "multipart"),
        ("body over the size limit", "/classify", raw(b"\xff" * (3 * 1024 * 1024), "image/jpeg"), 413, "limit"),
        ("batch over the file limit", "/classify_batch",
         {"files": [("images", (f"{i}.png", png, "image/png")) for i in range(129)]}, 413, "at most 128"),
        ("two images to /classify", "/classify",
         {"files": [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))]}, 400, "at most 1"),
        # valid images of every awkward kind
        ("1x1 png", "/classify", multipart("one.png", encode(Image.new("RGB", (1, 1), "red"), "PNG")), 200, ""),
        ("16-bit png", "/classify", multipart("16.png", encode(sixteen, "PNG")), 200, ""),
        ("cmyk jpeg", "/classify", multipart("c.jpg", encode(photo("CMYK"), "JPEG")), 200, ""),
        ("rgba png", "/classify", multipart("a.png", encode(photo("RGBA"), "PNG")), 200, ""),
        ("palette png", "/classify", multipart("p.png", encode(photo("P"), "PNG")), 200, ""),
        ("grayscale jpeg", "/classify", multipart("g.jpg", encode(photo("L"), "JPEG")), 200, ""),
        ("animated gif", "/classify", multipart("anim.gif", gif.getvalue(), "image/gif"), 200, ""),
        ("exif-rotated jpeg", "/classify", multipart("r.jpg", encode(photo(), "JPEG", exif=exif.tobytes())), 200, ""),
        ("webp", "/classify", multipart("w.webp", encode(photo(), "WEBP"), "image/webp"), 200, ""),
        ("bmp", "/classify", multipart("b.bmp", encode(photo(), "BMP"), "image/bmp"), 200, ""),
        ("large photo", "/classify", multipart("big.jpg", encode(Image.linear_gradient("L").resize((3000, 2000))
                                                            .convert("RGB"), "JPEG")), 200, ""),
        ("path separators in filename", "/classify", multipart("../../etc/passwd.jpg", jpeg, "image/jpeg"), 200, ""),
        ("non-ascii filename", "/classify", multipart("чайка 🐦.png", png, "image/png"), 200, ""),
        ("100 files in one batch", "/classify_batch",
         {"files": [("images", (f"{i}.png", png, "image/png")) for i in range(100)]}, 200, ""),
    ]
    return cases


def test_hostile_corpus_gets_its_expected_answers(served):
    url, _, project = served
    outcomes: dict[int, int] = {}
    cases = corpus()
    before = set((project / "server-tmp").rglob("*"))
    assert len(cases) >= 30
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, route, request, status, words in cases:
            response = client.post(route, **request)
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
            body = response.json()
            if status == 200:
                results = body["results"] if route == "/classify_batch" else [body]
                for result in results:
                    assert abs(sum(result["probabilities"].values()) - 1) < 1e-5, name
            else:
                assert words in body["error"], f"{name}: {body}"
        assert client.get("/readyz").status_code == 200
    print(f"{len(cases)} hostile cases, outcomes by status: {dict(sorted(outcomes.items()))}")
    # Uploads are parsed in memory: the corpus leaves no new file in the server's temp folder.
    assert set((project / "server-tmp").rglob("*")) - before == set()


def test_slow_client_is_cut_off_without_holding_the_service(served, toy_folder):
    url, _, _ = served
    host, port = url.removeprefix("http://").split(":")
    answer = {}

    def slow_upload() -> None:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            started = time.time()
            try:
                for _ in range(20):  # one byte a second, far slower than the 3 s read timeout
                    sock.sendall(b"\x89")
                    if select.select([sock], [], [], 1.0)[0]:
                        break  # the server answered (or closed) before the body was complete
            except OSError:
                pass
            sock.settimeout(10)
            try:
                answer["head"] = sock.recv(200)
            except OSError as error:
                answer["head"] = repr(error).encode()
            answer["seconds"] = time.time() - started

    thread = threading.Thread(target=slow_upload)
    thread.start()
    time.sleep(1)
    # Meanwhile the service answers other clients at once.
    image = sorted((toy_folder / "cat").glob("*.png"))[0]
    response = httpx.post(f"{url}/classify", files={"image": image.open("rb")}, timeout=10)
    assert response.status_code == 200
    thread.join(40)
    assert b"408" in answer["head"], answer
    assert answer["seconds"] < 10  # cut off after the 3 s read timeout, not after 20 s of bytes


def raw_exchange(url: str, head: bytes, body: bytes = b"", wait_for_answer_first: bool = False) -> bytes:
    """Send a request over a plain socket the way a given client does, and read the whole answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        if wait_for_answer_first:  # an Expect: 100-continue client waits for the server's word first
            select.select([sock], [], [], 3.0)
        else:
            sock.sendall(body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b'"}' in chunks[-1]:
                break
        return b"".join(chunks)


def json_error(answer: bytes) -> tuple[int, str]:
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body[body.index(b"{"):])["error"]


@pytest.mark.parametrize("how", ["keep-alive", "close", "http/1.0", "expect-100"])
def test_oversize_body_gets_a_json_413_however_the_client_sends_it(served, how):
    url, _, _ = served
    body = b"\0" * (3 * 1024 * 1024)  # the test service's limit is 2 MiB
    version = b"HTTP/1.0" if how == "http/1.0" else b"HTTP/1.1"
    headers = [b"POST /classify " + version, b"Host: 127.0.0.1", b"Content-Type: image/png",
               b"Content-Length: " + str(len(body)).encode()]
    if how == "close":
        headers.append(b"Connection: close")
    if how == "expect-100":
        headers.append(b"Expect: 100-continue")
    head = b"\r\n".join(headers) + b"\r\n\r\n"
    answer = raw_exchange(url, head, body, wait_for_answer_first=how == "expect-100")
    status, message = json_error(answer)
    assert status == 413 and "over the limit" in message, answer[:300]
    if how == "expect-100":
        assert b"100 Continue" not in answer  # refused before the body was sent


def test_python_urllib_gets_the_413_not_a_reset(served):
    """urllib sends `Connection: close` and the whole body before it reads: the classic reset case."""
    import json
    import urllib.error
    import urllib.request

    url, _, _ = served
    request = urllib.request.Request(f"{url}/classify", data=b"\0" * (3 * 1024 * 1024),
                                     headers={"Content-Type": "image/png"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413 and "over the limit" in json.loads(caught.value.read())["error"]


def test_unknown_path_wrong_method_and_huge_headers_are_json(served):
    url, _, _ = served
    missing = httpx.get(f"{url}/no-such-page")
    assert missing.status_code == 404 and "No route /no-such-page" in missing.json()["error"]
    wrong = httpx.get(f"{url}/classify")
    assert wrong.status_code == 405 and "use POST" in wrong.json()["error"] and wrong.headers["allow"] == "POST"
    crowded = httpx.get(f"{url}/model", headers={f"X-Filler-{i}": "x" for i in range(150)})
    assert crowded.status_code == 431 and "headers are too large" in crowded.json()["error"]
    heavy = httpx.post(f"{url}/classify", headers={"X-Filler": "x" * 20000})
    assert heavy.status_code == 431 and "too large" in heavy.json()["error"]
    # The host's own pages still answer next to the route table.
    assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/readyz").status_code == 200
    docs = httpx.get(f"{url}/docs.json").json()  # BentoML's own OpenAPI document, with every route of the table
    assert {"/classify", "/classify_batch", "/explain", "/model", "/ui", "/readyz"} <= set(docs["paths"])
