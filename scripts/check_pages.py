"""Open every page of the built book in headless Chromium, as a reader would, and report what is wrong.

    python scripts/check_pages.py [--html _build/html] [--widths 1400 390] [--strict] [--json out.json]

Serves the built site (``_build/html``, from ``jupyter-book build .``) on a local port, opens each page at a
desktop width (1,400 px) and a phone width (390 px, mobile emulation) and counts, per page and width:

- ``page-overflow``: the document is wider than the viewport (the whole page scrolls sideways);
- ``code-scroll``: a code cell's input (``pre``) scrolls sideways inside itself;
- ``listing-scroll``: any other code block (a listing of the package, an example) scrolls sideways;
- ``output-scroll``: a cell's output (text or table) scrolls sideways;
- ``table-offscreen``: a table reaches past the viewport with no scrolling box around it (a column cut off);
- ``img-lowres``: a chapter figure drawn at less than twice its displayed resolution (desktop only);
- ``img-thumb``: a Figures-page thumbnail narrower than 120 px on a desktop;
- ``img-unlinked``: a figure image that does not link to its full-size file;
- ``img-alt``: an image whose alt text is its file name (or missing);
- ``fig-small-text``: a chapter figure whose smallest text draws below 12 px on a desktop, from the build's figure
  records (``_build/.peftlab/figure-records``: size in inches and smallest font) and the width drawn; the
  phone's smallest is printed below the table (a phone shows a figure at up to 600 px, scrolled inside its box);
- ``math-error``: a MathJax error (``mjx-merror``);
- ``math-untypeset``: a math span MathJax left as TeX (MathJax missing: read offline, it came from a CDN);
- ``raw-tex``: TeX left in the reader's text (``$...$``, ``\\(``, ``\\Delta``...) outside code and math;
- ``anchor``: a link to an anchor (``#id``) that does not exist on its page;
- ``link``: a link, image, script or stylesheet to a local file that does not exist;
- ``http-404``: a request to the local server that failed (e.g. ``/favicon.ico``);
- ``external``: a request that leaves the machine (a copy of the book read offline loses it: MathJax from a
  CDN, for instance); external hosts are made unreachable so the page is seen as offline;
- ``colab-md``: a Colab launch button that opens a file Colab cannot open (not an ``.ipynb``);
- ``search-boxes``: more than one search box shown at the desktop width;
- ``thebe-twice``: Thebe's script included more than once;
- ``blank-header``: a table whose header row is empty;
- ``js-error``: an uncaught JavaScript exception while the page loads.

Needs Chromium (Debian: ``apt-get install chromium``; or set ``CHROMIUM=/path/to/chrome``). It drives the browser
through the Chrome DevTools Protocol over a pipe (``--remote-debugging-pipe``), so it needs nothing outside the
standard library. Prints a line per page with a problem, then a summary table; ``--strict`` exits 1 when any count
is non-zero. The desktop text column's width (what a figure is shown at) is printed too: the figure-legibility
test (tests/test_figure_legibility.py) uses it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parents[1]

CHECKS = (
    "page-overflow",
    "code-scroll",
    "listing-scroll",
    "output-scroll",
    "table-offscreen",
    "img-lowres",
    "img-thumb",
    "img-unlinked",
    "img-alt",
    "fig-small-text",
    "math-error",
    "math-untypeset",
    "raw-tex",
    "anchor",
    "link",
    "http-404",
    "external",
    "colab-md",
    "search-boxes",
    "thebe-twice",
    "blank-header",
    "js-error",
)

#: A figure's smallest text, in CSS pixels as drawn, below which it is too small to read (the page's small print).
MIN_TEXT_PX = 12.0

#: Thumbnails on the Figures page narrower than this on a desktop are too small to recognise.
MIN_THUMBNAIL_PX = 120

#: A chapter figure's image should hold at least this many image pixels per displayed CSS pixel.
MIN_DENSITY = 2.0

PHONE_WIDTH = 390

# What runs in the page once it has loaded (and MathJax has typeset it). Returns plain JSON.
_PROBE = r"""
async (desktop) => {
  const wait = ms => new Promise(r => setTimeout(r, ms));
  // Open every dropdown so what it hides is measured too.
  document.querySelectorAll('details').forEach(d => d.open = true);
  document.querySelectorAll('button.toggle-button').forEach(b => {
    if (b.getAttribute('aria-expanded') === 'false') b.click(); });
  document.querySelectorAll('.toggle-hidden').forEach(e => e.classList.remove('toggle-hidden'));
  document.querySelectorAll('img[loading="lazy"]').forEach(i => i.loading = 'eager');
  await Promise.all([...document.images].map(i => i.decode().catch(() => null)));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await Promise.race([MathJax.startup.promise, wait(15000)]); } catch (e) {}
  }
  await wait(50);
  const vw = document.documentElement.clientWidth;
  const shown = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
  const where = e => {
    const sec = e.closest('section[id]');
    const fig = e.closest('figure[id]');
    return (fig || sec) ? '#' + (fig || sec).id : '';
  };
  const text = e => (e.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 60);
  const out = {vw, problems: []};
  const add = (check, detail) => out.problems.push([check, detail]);
  const doc = document.scrollingElement || document.documentElement;
  if (doc.scrollWidth > vw + 1) {
    // The widest element that reaches past the viewport, to say what makes the page wide.
    let worst = null, right = vw;
    document.querySelectorAll('body *').forEach(e => {
      if (!shown(e)) return;
      const r = e.getBoundingClientRect();
      if (r.right > right + 1) { right = r.right; worst = e; }
    });
    add('page-overflow', `page is ${doc.scrollWidth} px wide in a ${vw} px viewport` +
        (worst ? `; widest: <${worst.tagName.toLowerCase()} class="${worst.className}"> ${where(worst)}` : ''));
  }
  const main = document.querySelector('main') || document.body;
  const article = document.querySelector('article.bd-article') || main;
  const cs = getComputedStyle(article);
  out.column = article.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  const body = document.querySelector('article p') || document.body;
  out.body_font = parseFloat(getComputedStyle(body).fontSize);
  const cap = document.querySelector('figcaption') || document.querySelector('.caption-text');
  out.caption_font = cap ? parseFloat(getComputedStyle(cap).fontSize) : null;
  main.querySelectorAll('pre').forEach(p => {
    if (!shown(p) || p.scrollWidth <= p.clientWidth + 1) return;
    const kind = p.closest('.cell_output, .output') ? 'output-scroll'
      : p.closest('.cell_input, .cell') ? 'code-scroll' : 'listing-scroll';
    add(kind, `${where(p)} pre ${p.scrollWidth} px in ${p.clientWidth} px: ${text(p).slice(0, 40)}`);
  });
  main.querySelectorAll('.cell_output > .output, .cell_output table').forEach(o => {
    if (!shown(o) || o.tagName === 'PRE' || o.querySelector('pre')) return;
    if (o.scrollWidth > o.clientWidth + 1)
      add('output-scroll', `${where(o)} ${o.tagName.toLowerCase()} ${o.scrollWidth} px in ${o.clientWidth} px`);
  });
  main.querySelectorAll('table').forEach(t => {
    if (!shown(t)) return;
    const r = t.getBoundingClientRect();
    let scroller = null;
    for (let e = t; e && e !== document.body; e = e.parentElement) {
      const ox = getComputedStyle(e).overflowX;
      if (ox === 'auto' || ox === 'scroll') { scroller = e; break; }
    }
    const box = scroller ? scroller.getBoundingClientRect() : null;
    if (r.right > vw + 1 && !(box && box.right <= vw + 1))
      add('table-offscreen', `${where(t)} table reaches ${Math.round(r.right)} px in a ${vw} px viewport`);
    const head = t.querySelector('thead');
    if (head && head.textContent.trim() === '' && !head.querySelector('img'))
      add('blank-header', `${where(t)} table with an empty header row`);
  });
  main.querySelectorAll('img').forEach(i => {
    if (!shown(i)) return;
    const w = i.getBoundingClientRect().width, nat = i.naturalWidth;
    const src = i.getAttribute('src') || '';
    const file = src.split('/').pop();
    const alt = (i.getAttribute('alt') || '').trim();
    if (!alt || alt === src || alt.endsWith(file) || /^[0-9a-f]{32,}\.\w+$/.test(alt))
      add('img-alt', `${where(i)} alt="${alt.slice(0, 50)}"`);
    const inFigure = i.closest('figure') && !src.includes('thumbnails/');
    const thumb = src.includes('thumbnails/');
    const svg = /\.svg(\?|$)/.test(src);
    if (desktop && inFigure && !svg && nat && nat / w < 2.0 - 1e-6)
      add('img-lowres', `${where(i)} ${file}: ${nat} px drawn at ${Math.round(w)} px (${(nat / w).toFixed(2)}x)`);
    if (desktop && thumb && w < 120)
      add('img-thumb', `${file} thumbnail drawn ${w.toFixed(1)} px wide`);
    if ((inFigure || thumb) && !i.closest('a[href]'))
      add('img-unlinked', `${where(i)} ${file} does not link to its full-size file`);
    (out.images = out.images || []).push({where: where(i), file, natural: nat, shown: +w.toFixed(1)});
  });
  document.querySelectorAll('mjx-merror').forEach(e => add('math-error', `${where(e)} ${text(e)}`));
  document.querySelectorAll('span.math, div.math').forEach(e => {
    if (!e.querySelector('mjx-container') && !e.closest('mjx-container'))
      add('math-untypeset', `${where(e)} ${text(e)}`);
  });
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const tex = /(\$[^$\s][^$]{0,80}\$)|\\\(|\\\)|\\\[|\\\]|\\[A-Za-z]{2,}/;
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const p = n.parentElement;
    if (!p || p.closest('pre, code, script, style, mjx-container, .math, .highlight, kbd, samp, textarea')) continue;
    if (!shown(p)) continue;
    const m = n.textContent.match(tex);
    if (m) add('raw-tex', `${where(p)} "${n.textContent.trim().slice(0, 70)}"`);
  }
  document.querySelectorAll('a[href^="#"]').forEach(a => {
    const id = decodeURIComponent(a.getAttribute('href').slice(1));
    if (id && !document.getElementById(id) && !document.getElementsByName(id).length)
      add('anchor', `${where(a)} #${id} ("${text(a)}")`);
  });
  const urls = [];
  document.querySelectorAll('a[href], img[src], script[src], link[href]').forEach(e => {
    const attr = e.hasAttribute('href') ? 'href' : 'src';
    urls.push([e.tagName.toLowerCase(), e.getAttribute(attr), e[attr] || '', text(e)]);
  });
  out.urls = urls;
  document.querySelectorAll('a[href*="colab.research.google.com"]').forEach(a => {
    if (!/\.ipynb(\?|#|$)/.test(a.href)) add('colab-md', `launch button opens ${a.href.split('/').pop()}`);
  });
  if (desktop) {
    const boxes = [...document.querySelectorAll('input[type="search"], button.search-button-field, .search-button')]
      .filter(e => shown(e) && e.getBoundingClientRect().width > 0 && !e.closest('article, .bd-search-container'));
    if (boxes.length > 1) add('search-boxes', `${boxes.length} search boxes shown`);
  }
  const thebe = [...document.querySelectorAll('script')].filter(s =>
      /sphinx-thebe\.js/.test(s.src || '') || /THEBE_JS_URL\s*=/.test(s.textContent || ''));
  const srcs = thebe.filter(s => s.src).length, inline = thebe.filter(s => !s.src).length;
  if (srcs > 1 || inline > 1) add('thebe-twice', `Thebe's script ${srcs}x, its configuration ${inline}x`);
  return out;
}
"""


class Chromium:
    """A headless Chromium driven over the DevTools protocol through a pipe (fds 3 and 4)."""

    def __init__(self, binary: str, offline: bool = True) -> None:
        self.profile = tempfile.mkdtemp(prefix="check-pages-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [
            binary,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--force-color-profile=srgb",
            "--font-render-hinting=none",
            f"--user-data-dir={self.profile}",
        ]
        if offline:  # every host but this machine unreachable: the page as a downloaded copy read offline
            args.append("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1")
        args.append("about:blank")

        def fds() -> None:
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            args, preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise TimeoutError(f"no reply to {method} in {timeout} s")
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for k, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    del self.events[k]
                    return event
            reply = self._read(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise TimeoutError(f"no {method} in {timeout} s")
            self.events.append(reply)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


class _Handler(http.server.SimpleHTTPRequestHandler):
    failures: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == 404:
            self.failures.append(self.path)
        super().send_error(code, message, explain)


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, list[str]]:
    failures: list[str] = []
    handler = type("Handler", (_Handler,), {"failures": failures})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, failures


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


_ids_cache: dict[Path, set[str]] = {}


def _ids(path: Path) -> set[str]:
    if path not in _ids_cache:
        html = path.read_text(errors="replace")
        _ids_cache[path] = set(re.findall(r'\b(?:id|name)="([^"]+)"', html))
    return _ids_cache[path]


def check_urls(urls: list[list[str]], page_url: str, site: Path, base: str) -> list[tuple[str, str]]:
    """Local links (resolved by the browser) whose file, or whose #anchor in another page, is missing."""
    problems = []
    for tag, raw, resolved, label in urls:
        if not raw or raw.startswith(("#", "mailto:", "javascript:", "data:")):
            continue
        url = resolved or urljoin(page_url, raw)
        if not url.startswith(base):
            continue
        parts = urlsplit(url)
        rel = unquote(parts.path)[1:]
        target = site / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(("link", f"<{tag}> {raw} ({label[:30]}): no such file"))
        elif parts.fragment and target.suffix == ".html" and urlsplit(page_url).path != parts.path:
            if unquote(parts.fragment) not in _ids(target):
                problems.append(("anchor", f"<{tag}> {raw}: no #{parts.fragment} in {rel}"))
    return problems


def figure_records(site: Path) -> dict[str, dict[str, Any]]:
    """The legibility each figure's record holds (written by save_figure beside the built site), by name."""
    folder = site.parent / ".peftlab" / "figure-records"
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        if "legibility" in record:
            out[record["name"]] = record["legibility"]
    return out


def figure_text(images: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> list[tuple[str, float]]:
    """(name, px) for each chapter figure whose smallest text draws below MIN_TEXT_PX: the record's smallest
    font in points and width in inches, at the width the browser drew the image."""
    small = []
    for image in images:
        name = image["where"].removeprefix("#fig-")
        legible = records.get(name)
        if not image["where"].startswith("#fig-") or legible is None or not image["shown"]:
            continue
        px = legible["smallest_pt"] / 72 * image["shown"] / legible["width_in"]
        if px < MIN_TEXT_PX - 0.05:
            small.append((name, px))
    return small


def check_page(browser: Chromium, session: str, url: str, width: int) -> dict[str, Any]:
    phone = width <= 600
    browser.send("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 900 if not phone else 844, "deviceScaleFactor": 1, "mobile": phone,
    }, session)
    browser.send("Emulation.setTouchEmulationEnabled", {"enabled": phone}, session)
    browser.events.clear()
    browser.send("Page.navigate", {"url": url}, session)
    browser.wait_event("Page.loadEventFired", session, timeout=60)
    result = browser.send("Runtime.evaluate", {
        "expression": f"({_PROBE})({'false' if phone else 'true'})",
        "awaitPromise": True, "returnByValue": True,
    }, session, timeout=90)
    if "exceptionDetails" in result:
        raise RuntimeError(f"the probe failed on {url}: {result['exceptionDetails']}")
    value = result["result"]["value"]
    external = sorted({
        e["params"]["request"]["url"].split("?")[0]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
        and urlsplit(e["params"]["request"]["url"]).hostname not in (None, "127.0.0.1", "localhost")
        and urlsplit(e["params"]["request"]["url"]).scheme in ("http", "https")
    })
    value["external"] = external
    value["js_errors"] = [
        e["params"]["exceptionDetails"].get("exception", {}).get("description", "")
        or e["params"]["exceptionDetails"].get("text", "")
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown" and e.get("sessionId") == session
    ]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="the built site")
    parser.add_argument("--widths", type=int, nargs="+", default=[1400, PHONE_WIDTH])
    parser.add_argument("--pages", nargs="*", help="only these pages (paths relative to the site)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any count is non-zero")
    parser.add_argument("--json", type=Path, help="write every problem and measurement here")
    parser.add_argument("--quiet", action="store_true", help="the summary only, no line per problem")
    parser.add_argument("--online", action="store_true", help="let the pages reach other hosts")
    args = parser.parse_args(argv)

    site = args.html.resolve()
    if not (site / "index.html").is_file():
        print(f"no built book at {site} (build it: jupyter-book build .)", file=sys.stderr)
        return 2
    binary = find_chromium()
    if binary is None:
        print("Chromium is not installed: apt-get install chromium (or set CHROMIUM=/path/to/chrome)",
              file=sys.stderr)
        return 2
    pages = args.pages or sorted(
        str(p.relative_to(site)) for p in site.rglob("*.html")
        if not p.relative_to(site).parts[0].startswith("_") and p.name != "index.html"
        or p.relative_to(site) == Path("index.html")
    )
    pages = [p for p in pages if (site / p).read_text(errors="replace").count("<") > 5]  # not redirects

    server, failures = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    browser = Chromium(binary, offline=not args.online)
    counts: dict[int, Counter[str]] = {w: Counter() for w in args.widths}
    report: dict[str, Any] = {"pages": defaultdict(dict)}
    columns, fonts = [], []
    records = figure_records(site)
    phone_text: list[tuple[float, str]] = []
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            browser.send(f"{domain}.enable", {}, session)
        browser.send("Network.setCacheDisabled", {"cacheDisabled": False}, session)
        for page in pages:
            for width in args.widths:
                failures.clear()
                url = base + page
                value = check_page(browser, session, url, width)
                problems = [tuple(p) for p in value["problems"]]
                problems += check_urls(value.pop("urls"), url, site, base)
                problems += [("http-404", path) for path in sorted(set(failures))]
                problems += [("external", u) for u in value["external"]]
                problems += [("js-error", m.splitlines()[0][:120]) for m in value["js_errors"]]
                small = figure_text(value.get("images", []), records)
                for name, px in small:
                    if width > 600:
                        problems.append(("fig-small-text", f"{name}: smallest text {px:.1f} px as shown"))
                    else:
                        phone_text.append((px, name))
                if width > 600 and "/chapters/" in page:
                    columns.append(value["column"])
                    fonts.append((value["body_font"], value["caption_font"]))
                for check, _ in problems:
                    counts[width][check] += 1
                report["pages"][page][width] = {
                    "problems": problems, "column": value["column"], "images": value.get("images", []),
                }
                if problems and not args.quiet:
                    print(f"\n{page} at {width} px:")
                    for check, detail in problems:
                        print(f"  {check:15} {detail}")
    finally:
        browser.close()
        server.shutdown()

    print(f"\n{len(pages)} pages at {', '.join(f'{w} px' for w in args.widths)}")
    if columns:
        body, caption = fonts[0]
        print(f"desktop text column: {min(columns):.0f}-{max(columns):.0f} px; body text {body} px, "
              f"captions {caption} px")
    header = f"{'check':16}" + "".join(f"{str(w) + ' px':>10}" for w in args.widths)
    print(header)
    print("-" * len(header))
    for check in CHECKS:
        print(f"{check:16}" + "".join(f"{counts[w][check]:>10}" for w in args.widths))
    if phone_text and PHONE_WIDTH in args.widths:
        px, name = min(phone_text)
        print(f"smallest figure text on a phone: {px:.1f} px ({name}); each figure links to its full-size file")
    if not records:
        print("no figure records with legibility in the build: fig-small-text not checked")
    total = sum(sum(c.values()) for c in counts.values())
    print("-" * len(header))
    print(f"{'total':16}" + "".join(f"{sum(counts[w].values()):>10}" for w in args.widths))
    if args.json:
        report["counts"] = {w: dict(c) for w, c in counts.items()}
        report["column"] = [min(columns), max(columns)] if columns else None
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if args.strict and total else 0


if __name__ == "__main__":
    sys.exit(main())
