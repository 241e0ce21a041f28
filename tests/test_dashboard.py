"""The dashboard in a real headless Chromium: it loads offline, lists the vans, draws the map.

Chromium runs the page's JavaScript against the real server (``--virtual-time-budget``
lets the fetches and rendering finish), then ``--dump-dom`` gives the DOM after the
scripts ran and ``--screenshot`` a picture (in the test's tmp folder; DATALAB_UPDATE_SCREENSHOT=1
refreshes docs/dashboard.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from receiver import dbapi
from receiver.api import make_server
from tests.datalab_synth import flag_values, make_store, with_aggregates

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dashboard-test-token"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Chromium is not installed: run scripts/test, which installs the Debian package chromium "
                    "(or: apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    store = make_store(tmp_path_factory.mktemp("dash") / "datalab.sqlite")
    # Every 50th PM sample is flagged stuck: the flag policy leaves it out, the popup counts it.
    flag_values(store, [(f"van-{v}", f"e{d}", 3 * s + 1, {}, "", {"pm25": "stuck", "pm10": "stuck"})
                        for v in ("001", "002") for d in range(3) for s in range(0, 1800, 50)])
    with_aggregates(store)
    server = make_server(str(store), "127.0.0.1", 0, token=TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", store
    server.shutdown()
    server.server_close()


def run_chromium(tmp_path: Path, url: str, *extra: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    res = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


class Dom(HTMLParser):
    """Just enough of the DOM: elements by id, map paths, fleet rows and texts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.paths: list[dict[str, str]] = []
        self.rows: dict[str, list[str]] = {}
        self.attrs_by_id: dict[str, dict[str, str]] = {}
        self.text_by_id: dict[str, str] = {}
        self.body: dict[str, str] = {}
        self._open_ids: list[str] = []
        self._row: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if "id" in a:
            self.attrs_by_id[a["id"]] = a
            self.text_by_id[a["id"]] = ""
            self._open_ids.append(a["id"])
        if tag == "path" and "unit" in a.get("class", ""):
            self.paths.append(a)
        if tag == "tr" and "data-device" in a:
            self._row = a["data-device"]
            self.rows[self._row] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag in ("span", "svg") and self._open_ids:
            self._open_ids.pop()

    def handle_data(self, data: str) -> None:
        if self._row is not None and data.strip():
            self.rows[self._row].append(data.strip())
        if self._open_ids:
            self.text_by_id[self._open_ids[-1]] += data


def published(store: Path, scheme: str, quantity: str) -> int:
    return dbapi.fetchall(dbapi.connect(store), "SELECT count(*) FROM aggregates WHERE published = 1 AND"
                          " scheme = ? AND period = 'all' AND quantity = ?", (scheme, quantity))[0][0]


def test_dashboard_lists_the_vans_and_draws_the_segments(site: tuple[str, Path], tmp_path: Path) -> None:
    base, store = site
    dom = Dom(run_chromium(tmp_path, f"{base}/web/#token={TOKEN}", "--dump-dom"))
    assert dom.body.get("data-ready") == "1", "the page's script did not finish"
    # Fleet table: both simulated vans, with their heartbeat facts.
    assert set(dom.rows) == {"van-001", "van-002"}
    assert "online" in dom.rows["van-001"] and "offline" in dom.rows["van-002"]
    assert "pm: 3" in dom.rows["van-002"] and "120" in dom.rows["van-002"]
    # Map: one SVG path per published segment of the default view (PM2.5, all data).
    n = published(store, "segment", "pm25")
    assert n > 50
    assert len(dom.paths) == n and all(p["class"] == "unit line" and p["d"].startswith("M") for p in dom.paths)
    assert dom.attrs_by_id["map"]["data-drawn"] == str(n)
    assert re.search(rf"\b{n} segments drawn", dom.text_by_id["map-status"])
    # Hover text: value, passes, days and the values the flag policy left out, per unit.
    left_out = dict(dbapi.fetchall(dbapi.connect(store), "SELECT cell, n_excluded FROM aggregates WHERE"
                                   " published = 1 AND scheme = 'segment' AND period = 'all' AND quantity = 'pm25'"))
    assert {p["data-cell"]: int(p["data-excluded"]) for p in dom.paths} == left_out and sum(left_out.values()) > 0
    assert all(f", {left_out[p['data-cell']]} flagged values left out)" in p["data-text"] for p in dom.paths)
    strokes = {p["stroke"] for p in dom.paths}  # coloured by value: PM2.5 ~20 on primary roads, ~9 on service
    assert "#91cf60" in strokes and strokes & {"#fee08b", "#fc8d59"}


def test_dashboard_quantity_and_cells_without_a_token(site: tuple[str, Path], tmp_path: Path) -> None:
    base, store = site
    dom = Dom(run_chromium(tmp_path, f"{base}/web/?quantity=laeq&scheme=h3:10", "--dump-dom"))
    assert dom.body.get("data-ready") == "1"
    assert dom.rows == {}  # no token: no fleet
    assert "token" in dom.text_by_id["fleet-status"]
    assert len(dom.paths) == published(store, "h3:10", "laeq")
    assert all(p["class"] == "unit cell" and p["d"].endswith("Z") for p in dom.paths)


def test_dashboard_screenshot(site: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = site
    shot = tmp_path / "dashboard.png"
    run_chromium(tmp_path, f"{base}/web/?quantity=pm25#token={TOKEN}", "--window-size=1400,900",
                 f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # The picture in the docs is refreshed on request only, so a test run leaves the tree clean.
    if os.environ.get("DATALAB_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "dashboard.png")
