"""The gallery in a real browser: Debian's headless Chromium driven by Playwright (executable_path, no browser
download). Screenshots of the main views land in $LOUPE_TEST_ARTIFACTS (default .loupe-test/screenshots)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_restarts import Server
from tests.fixtures.images import shape_set

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(
    os.environ.get(
        "LOUPE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".loupe-test" / "screenshots"
    )
)


@pytest.fixture(scope="module")
def gallery(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path
) -> Iterator[tuple[str, dict[int, tuple[str, str]]]]:
    tmp = tmp_path_factory.mktemp("ui")
    server = Server(
        tmp / "data",
        {"LOUPE_CLIP_MODEL": str(tiny_clip_dir), "LOUPE_OCR__ENABLED": "false"},
        tmp / "server.log",
    )
    try:
        server.wait_healthy()
        shapes = shape_set(per_class=2, seed=31)
        res = httpx.post(
            server.url + "/api/images",
            files=[("file", (s.name, s.data, "image/png")) for s in shapes],
            timeout=60,
        )
        labels = {f["id"]: (s.colour, s.shape) for f, s in zip(res.json()["files"], shapes, strict=True)}
        with httpx.Client() as poll:  # one client: httpx.get builds one, TLS context and all, per call
            for _ in range(300):
                if poll.get(server.url + "/api/health").json()["counts"]["ready"] == len(shapes):
                    break
                time.sleep(0.1)
        yield server.url, labels
    finally:
        server.stop()


@pytest.fixture
def page(gallery):
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/setup.sh --test installs it")
        pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        pg = browser.new_page(viewport={"width": 1200, "height": 800})
        errors: list[str] = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.errors = errors  # type: ignore[attr-defined]
        yield pg
        browser.close()


def result_ids(pg) -> list[int]:
    return [
        int(x)
        for x in pg.eval_on_selector_all("#grid figure:not([hidden])", "els => els.map(e => e.dataset.id)")
    ]


def settled(pg) -> None:
    """The grid has finished loading (it sets aria-busy while a page of results is on its way)."""
    pg.wait_for_function("document.querySelector('#grid').getAttribute('aria-busy') === 'false'")


def wait_results(pg, minimum: int = 1) -> None:
    pg.wait_for_function(f"document.querySelectorAll('#grid figure').length >= {minimum}")


def test_loads_without_errors_and_a_text_search_finds_the_right_shapes(page, gallery):
    url, labels = gallery
    page.goto(url + "/")
    wait_results(page, len(labels))
    assert "Newest first" in page.inner_text("#status") or "pictures" in page.inner_text("#status")
    page.fill("#q", "a yellow star")
    page.press("#q", "Enter")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Results')")
    top = result_ids(page)[:2]
    assert [labels[i] for i in top] == [("yellow", "star")] * 2
    scores = [
        float(s)
        for s in page.eval_on_selector_all("#grid figure .score", "els => els.map(e => e.textContent)")
    ]
    assert scores == sorted(scores, reverse=True)
    page.screenshot(path=str(ARTIFACTS / "search.png"))
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_url_restores_a_search_and_back_goes_back(page, gallery):
    url, labels = gallery
    page.goto(url + "/?q=a%20blue%20circle")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Results')")
    assert labels[result_ids(page)[0]] == ("blue", "circle")
    page.fill("#q", "a green cross")
    page.press("#q", "Enter")
    page.wait_for_function("location.search.includes('green')")
    page.go_back()
    page.wait_for_function("document.querySelector('#q').value === 'a blue circle'")


def test_more_like_this_changes_the_results_and_the_cutoff_hides_low_scores(page, gallery):
    url, labels = gallery
    page.goto(url + "/?q=a%20red%20square")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Results')")
    before = result_ids(page)
    purple = next(i for i, lab in labels.items() if lab == ("purple", "triangle"))
    page.goto(url + f'/?query=[{{"text":"a red square","weight":1}},{{"image_id":{purple},"weight":1.5}}]')
    page.wait_for_function("document.querySelectorAll('#mixer .term').length === 2")
    settled(page)
    after = result_ids(page)
    assert after[:5] != before[:5]
    first = page.query_selector("#grid figure")
    first.query_selector("button[title='Less like this']").click()
    page.wait_for_function("document.querySelectorAll('#mixer .term').length === 3")
    settled(page)
    page.query_selector_all("#grid figure")[3].query_selector("button[title='More like this']").click()
    page.wait_for_function("document.querySelectorAll('#mixer .term').length === 4")
    settled(page)
    page.eval_on_selector("#cutoff", "el => { el.value = '0.9'; el.dispatchEvent(new Event('input')); }")
    visible = page.eval_on_selector_all(
        "#grid figure:not([hidden]) .score", "els => els.map(e => +e.textContent)"
    )
    hidden = page.eval_on_selector_all("#grid figure[hidden] .score", "els => els.map(e => +e.textContent)")
    assert all(s >= 0.9 for s in visible) and hidden and all(s < 0.9 for s in hidden)
    assert page.is_hidden("#filters")  # the filters panel stays closed until asked for
    page.screenshot(path=str(ARTIFACTS / "mixer-cutoff.png"))


def test_dropping_a_picture_on_the_search_box_searches_by_it(page, gallery, tmp_path: Path):
    url, labels = gallery
    query = next(s for s in shape_set(per_class=1, seed=777) if (s.colour, s.shape) == ("orange", "circle"))
    page.goto(url + "/")
    wait_results(page)
    page.evaluate(
        """async (bytes) => {
            const file = new File([new Uint8Array(bytes)], 'query.png', {type: 'image/png'});
            const dt = new DataTransfer(); dt.items.add(file);
            document.querySelector('#q').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""",
        list(query.data),
    )
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Similar to')")
    assert labels[result_ids(page)[0]][0] == "orange"
    assert "query.png" in page.inner_text("#mixer")


def test_an_upload_shows_progress_and_the_new_pictures_appear(page, gallery, tmp_path: Path):
    url, labels = gallery
    new = shape_set(per_class=1, seed=888)[:3]
    paths = []
    for s in new:
        p = tmp_path / s.name
        p.write_bytes(s.data)
        paths.append(str(p))
    dup = tmp_path / "again.png"
    dup.write_bytes(shape_set(per_class=2, seed=31)[0].data)  # stored already: skipped before sending
    page.goto(url + "/")
    wait_results(page, len(labels))
    page.set_input_files("#upload", [*paths, str(dup)])
    page.wait_for_function("document.querySelector('#upload-progress').value === 4")
    rows = page.inner_text("#upload-list")
    assert rows.count("accepted") == 3 and "already stored" in rows
    newest = [i["id"] for i in httpx.get(url + "/api/images", params={"limit": 3}).json()["images"]]
    assert not set(newest) & set(labels)
    # Newest first: the new pictures lead the grid once it refreshes.
    page.wait_for_function(
        f"[...document.querySelectorAll('#grid figure')].slice(0, 3).map(f => +f.dataset.id).join() === '{','.join(map(str, newest))}'",
        timeout=20_000,
    )
    page.screenshot(path=str(ARTIFACTS / "upload.png"))


def test_the_detail_view_shows_metadata_similar_pictures_and_closes_with_escape(page, gallery):
    url, _ = gallery
    page.goto(url + "/?q=a%20green%20square")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Results')")
    page.focus("#grid figure")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    page.wait_for_selector("dialog#detail[open]")
    facts = page.inner_text("#detail-facts")
    assert "Size" in facts and "PNG" in facts and "Added" in facts
    page.wait_for_function("document.querySelectorAll('#detail-similar img').length > 0")
    page.screenshot(path=str(ARTIFACTS / "detail.png"))
    page.keyboard.press("Escape")
    page.wait_for_function("!document.querySelector('dialog#detail').open")
    assert page.errors == []  # type: ignore[attr-defined]


def test_the_javascript_sha256_fallback_matches_the_browser(page, gallery):
    """Plain-HTTP LAN addresses have no crypto.subtle: the fallback must give the same digests."""
    import hashlib

    url, _ = gallery
    page.goto(url + "/")
    samples = ["", "abc", "x" * 1000, "Loupe 🙂"]
    got = page.evaluate(
        """async (samples) => {
            const m = await import('/sha256.js');
            return samples.map((s) => m.sha256js(new TextEncoder().encode(s).buffer));
        }""",
        samples,
    )
    assert got == [hashlib.sha256(s.encode()).hexdigest() for s in samples]


def test_the_filters_panel_narrows_results_and_lives_in_the_url(page, gallery):
    url, labels = gallery
    big = next(iter(labels))
    httpx.patch(url + f"/api/images/{big}", json={"add_tags": ["keeper"], "starred": True})
    page.goto(url + "/")
    wait_results(page, 10)
    page.click("#toggle-filters")
    page.fill("#filters input[name=tags]", "keeper")
    page.check("#filters input[name=starred]")
    page.select_option("#filters select[name=aspect]", "square")
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#grid figure').length === 1")
    assert result_ids(page) == [big]
    assert "keeper" in page.evaluate("decodeURIComponent(location.search)")
    page.screenshot(path=str(ARTIFACTS / "filters.png"))
    page.reload()
    page.wait_for_function("document.querySelectorAll('#grid figure').length === 1")
    assert page.input_value("#filters input[name=tags]") == "keeper"


def test_signing_in_with_a_key_when_keys_are_required(tmp_path: Path, tiny_clip_dir: Path):
    if not CHROMIUM:
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    env = {"LOUPE_CLIP_MODEL": str(tiny_clip_dir), "LOUPE_OCR__ENABLED": "false", "LOUPE_AUTH__MODE": "on"}
    server = Server(tmp_path / "data", env, tmp_path / "server.log")
    try:
        server.wait_healthy()
        admin = next(line.split()[-1] for line in server.log.read_text().splitlines() if "loupe_" in line)
        httpx.post(
            server.url + "/api/images",
            files=[("file", ("a.png", shape_set(1, seed=5)[0].data, "image/png"))],
            headers={"Authorization": f"Bearer {admin}"},
        )
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            pg = browser.new_page()
            pg.goto(server.url + "/")
            pg.wait_for_selector("dialog#signin[open]")
            pg.fill("#signin-key", "loupe_00000000_wrong-key")
            pg.click("#signin-form button[type=submit]")
            pg.wait_for_function("document.querySelector('#signin-error').textContent.includes('not valid')")
            pg.fill("#signin-key", admin)
            pg.click("#signin-form button[type=submit]")
            pg.wait_for_function("document.querySelectorAll('#grid figure').length === 1")
            cookies = {c["name"]: c for c in pg.context.cookies()}
            assert cookies["loupe_session"]["httpOnly"] is True
            assert pg.evaluate("document.cookie") == ""  # not readable from scripts
            assert pg.evaluate("localStorage.length") == 0
            src = pg.get_attribute("#grid figure img", "src")
            assert "sig=" in src
            pg.screenshot(path=str(ARTIFACTS / "signed-in.png"))
            browser.close()
    finally:
        server.stop()
