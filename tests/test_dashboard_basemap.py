"""The dashboard's basemap, legend and fleet table in a real headless Chromium (issue 17.6c).

Offline (the default, and all this machine has): the street lines the map units come from are
drawn under the data. With a tile URL set, the page loads those tiles, here from a tile server
of the test's own on loopback, which records what it was asked for. The legend sits off the
data and the fleet table fits the page: checked on the DOM's layout and on a screenshot's pixels.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import urllib.request
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from receiver.basemap import Basemap
from receiver.api import make_server
from tests.datalab_synth import make_store, with_aggregates
from tests.test_dashboard import TOKEN, Dom, run_chromium

DATA_COLOURS = ["#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027", "#7b0a3c"]  # app.js COLOURS
STREET = "#c3cad0"  # style.css #map .street


def png(rgb: tuple[int, int, int], size: int = 256) -> bytes:
    """A solid PNG tile (RGB, 8 bit), written by hand: no imaging library in the test venv."""
    raw = b"".join(b"\x00" + bytes(rgb) * size for _ in range(size))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def read_png(data: bytes) -> np.ndarray:
    """Chromium's screenshot as an (h, w, 3) array: 8-bit RGB or RGBA, not interlaced."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h, ch = 8, b"", 0, 0, 3
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
            ch = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * ch)
    out = np.zeros((h, w * ch), dtype=np.int32)
    prev = np.zeros(w * ch, dtype=np.int32)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        cur = np.zeros(w * ch, dtype=np.int32)
        if f in (0, 2):
            cur = (line + (prev if f == 2 else 0)) & 0xFF
        elif f == 1:  # sub: a running sum per channel
            cur = (np.cumsum(line.reshape(w, ch), axis=0) & 0xFF).reshape(-1)
        else:  # sub, average, paeth: each byte depends on the one ch bytes to its left
            for i in range(w * ch):
                a = cur[i - ch] if i >= ch else 0
                b, c = prev[i], (prev[i - ch] if i >= ch else 0)
                if f == 1:
                    pred = a
                elif f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                cur[i] = (line[i] + pred) & 0xFF
        out[y], prev = cur, cur
    return out.reshape(h, w, ch)[:, :, :3]


def pixels_of(img: np.ndarray, colours: list[str], box: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the pixels inside ``box`` (left, top, right, bottom) that have one of ``colours``."""
    l, t, r, b = box
    part = img[t:b, l:r]
    hit = np.zeros(part.shape[:2], dtype=bool)
    for c in colours:
        hit |= np.all(part == [int(c[i:i + 2], 16) for i in (1, 3, 5)], axis=2)
    ys, xs = np.nonzero(hit)
    return ys + t, xs + l


def overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class Page(Dom):
    def __init__(self, html: str) -> None:
        self.images: list[dict[str, str]] = []
        self.streets = 0
        super().__init__(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        super().handle_starttag(tag, attrs)
        a = {k: v or "" for k, v in attrs}
        if tag == "image":
            self.images.append(a)
        if tag == "path" and a.get("class", "").startswith("street"):
            self.streets += 1

    @property
    def layout(self) -> dict[str, list[int]]:
        return json.loads(self.body["data-layout"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = make_store(tmp_path_factory.mktemp("basemap") / "datalab.sqlite")
    with_aggregates(s)
    return s


def _serve(store: Path, basemap: Basemap) -> Iterator[str]:
    server = make_server(str(store), "127.0.0.1", 0, token=TOKEN, basemap=basemap)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def offline(store: Path) -> Iterator[str]:
    yield from _serve(store, Basemap())


class Tiles:
    def __init__(self) -> None:
        self.asked: list[str] = []
        tile, asked = png((0xE4, 0xEB, 0xD8)), self.asked

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                asked.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(tile)))
                self.end_headers()
                self.wfile.write(tile)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tiles/{{z}}/{{x}}/{{y}}.png"


@pytest.mark.parametrize("width", [1400, 900])
def test_offline_streets_legend_off_the_data_and_the_table_fits(offline: str, tmp_path: Path, width: int) -> None:
    size = f"--window-size={width},1000"
    page = Page(run_chromium(tmp_path, f"{offline}/web/#token={TOKEN}", size, "--dump-dom"))
    assert page.body.get("data-ready") == "1"
    m = page.attrs_by_id["map"]
    assert m["data-basemap"] == "streets" and int(m["data-basemap-items"]) == page.streets > 0
    assert page.images == []  # nothing loaded from elsewhere
    lay = page.layout
    assert len(page.rows) == 2 and int(m["data-drawn"]) > 50
    assert not overlap(lay["legend"], lay["data"]), lay
    assert lay["legend"][1] >= lay["map"][3], "the legend sits under the map"
    assert lay["page_width"] <= lay["viewport"][0], lay
    assert lay["table"][2] <= min(lay["fleet"][2], lay["viewport"][0]), lay
    # The same view as a picture: the data's pixels stay clear of the legend, streets are drawn.
    shot = tmp_path / "dash.png"
    run_chromium(tmp_path, f"{offline}/web/#token={TOKEN}", size, f"--screenshot={shot}")
    img = read_png(shot.read_bytes())
    assert img.shape[1] == width
    ys, xs = pixels_of(img, DATA_COLOURS, lay["map"])
    assert len(xs) > 500, "the map's data is in the picture"
    data_box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert not overlap(data_box, lay["legend"]), (data_box, lay["legend"])
    assert len(pixels_of(img, [STREET], lay["map"])[0]) > 100, "no street drawn"
    # ... and the table's right edge is inside the picture: its last column is on screen.
    assert lay["table"][2] <= img.shape[1]


def test_tiles_from_the_configured_url(store: Path, tmp_path: Path) -> None:
    tiles = Tiles()
    try:
        gen = _serve(store, Basemap(tile_url=tiles.url, attribution="© test tiles"))
        base = next(gen)
        with urllib.request.urlopen(f"{base}/web/index.html") as r:
            csp = r.headers["Content-Security-Policy"]
        assert f"img-src 'self' data: http://127.0.0.1:{tiles.server.server_address[1]};" in csp
        html = run_chromium(tmp_path, f"{base}/web/", "--window-size=1400,1000", "--dump-dom")
        page = Page(html)
        assert page.body.get("data-ready") == "1"
        assert page.attrs_by_id["map"]["data-basemap"] == "tiles" and page.streets == 0
        hrefs = [i["href"] for i in page.images]
        assert 0 < len(hrefs) <= 64 and int(page.attrs_by_id["map"]["data-basemap-items"]) == len(hrefs)
        prefix = tiles.url.split("{z}")[0]
        assert all(h.startswith(prefix) and h.endswith(".png") for h in hrefs)
        assert {"/" + h.split("/", 3)[3] for h in hrefs} <= set(tiles.asked), "the browser fetched the tiles"
        # The tiles cover the data: the tile holding the data's first point was drawn.
        z = int(hrefs[0].split("/")[-3])
        fc = json.load(urllib.request.urlopen(f"{base}/api/v1/aggregates?scheme=segment&period=all&quantity=pm25"
                                              "&format=geojson"))
        lon, lat = fc["features"][0]["geometry"]["coordinates"][0]
        tx = int((lon + 180) / 360 * 2 ** z)
        ty = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * 2 ** z)
        assert f"{prefix}{z}/{tx}/{ty}.png" in hrefs
        assert '<p id="attribution">© test tiles</p>' in html
    finally:
        gen.close()
        tiles.server.shutdown()


def test_basemap_route_and_bad_settings(offline: str) -> None:
    with urllib.request.urlopen(f"{offline}/api/v1/basemap?bbox=4.6,52.1,4.7,52.2") as r:
        near = json.load(r)
    with urllib.request.urlopen(f"{offline}/api/v1/basemap?bbox=5.0,53.0,5.1,53.1") as r:
        far = json.load(r)
    assert near["tile_url"] is None and len(near["streets"]["features"]) > 10
    assert far["streets"]["features"] == []
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{offline}/api/v1/basemap?bbox=north")
    assert err.value.code == 400
    with pytest.raises(ValueError, match="lacks"):
        Basemap(tile_url="https://tiles.example.org/{z}/{x}.png")
