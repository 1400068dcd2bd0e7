"""The demo's HTML report in a real browser (headless Chromium, no extra Python packages).

One ``backdoorlab demo --quick`` run per module builds the report. Each check loads a copy of it with
two small scripts added: one at the top of <head> (before any of the page's own scripts) records
console.error calls, uncaught errors and failed resource loads; one before </body> measures, on
window load, every <img> and every element's right edge, and writes the findings as JSON into a
<pre id="bdl-check">, which ``--dump-dom`` prints and this module parses. Skipped when no Chromium
binary is on PATH (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((p for p in map(shutil.which, BROWSERS) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason=f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)})")

HEIGHT = 2000
WIDE, NARROW = 1280, 800

HEAD_SCRIPT = """<script>
window.__bdl = {errors: [], resource_errors: []};
(function () {
  var orig = console.error;
  console.error = function () {
    var parts = Array.prototype.map.call(arguments, String);
    window.__bdl.errors.push('console.error: ' + parts.join(' '));
    return orig.apply(this, arguments);
  };
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {
      var where = String(t.src || t.href || '').slice(0, 80);
      window.__bdl.resource_errors.push(t.tagName.toLowerCase() + ' ' + where);
    } else {
      window.__bdl.errors.push('uncaught: ' + e.message + ' at ' + e.filename + ':' + e.lineno);
    }
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    window.__bdl.errors.push('unhandled rejection: ' + String(e.reason));
  });
})();
</script>"""

TAIL_SCRIPT = """<script>
window.addEventListener('load', function () {
  function name(el) {
    var s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    var cls = typeof el.className === 'string' ? el.className.trim() : '';
    if (cls) s += '.' + cls.split(/\\s+/).join('.');
    return s;
  }
  function path(el) {
    var out = [];
    for (var e = el; e && e !== document.documentElement; e = e.parentElement) out.unshift(name(e));
    return out.join(' > ');
  }
  var imgs = Array.prototype.map.call(document.images, function (img, i) {
    return {index: i, ok: img.complete && img.naturalWidth > 0, complete: img.complete,
            naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
            alt: img.alt || '', src: String(img.getAttribute('src') || '').slice(0, 60)};
  });
  var width = document.documentElement.clientWidth;
  var wide = [];
  var all = [document.body].concat(Array.prototype.slice.call(document.body.querySelectorAll('*')));
  function inScroller(el) {  // inside a box that scrolls sideways: reachable, not sticking out
    for (var e = el.parentElement; e && e !== document.body; e = e.parentElement) {
      var o = getComputedStyle(e).overflowX;
      if (o === 'auto' || o === 'scroll') return true;
    }
    return false;
  }
  all.forEach(function (el) {
    var r = el.getBoundingClientRect();
    // the box itself, or its content spilling out of it (a long <pre> line, an unbroken word)
    var spill = getComputedStyle(el).overflowX === 'visible' ? r.left + el.scrollWidth : r.right;
    var right = Math.max(r.right, spill);
    if (right > width + 1 && !inScroller(el)) {
      wide.push({element: path(el), right: Math.round(right), box_right: Math.round(r.right),
                 width: Math.round(r.width),
                 text: (el.textContent || '').replace(/\\s+/g, ' ').trim().slice(0, 60)});
    }
  });
  var pre = document.createElement('pre');
  pre.id = 'bdl-check';
  pre.hidden = true;
  pre.textContent = JSON.stringify({clientWidth: width, scrollWidth: document.documentElement.scrollWidth,
                                    images: imgs, overflow: wide, errors: window.__bdl.errors,
                                    resource_errors: window.__bdl.resource_errors});
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    # --no-sandbox: Chromium's sandbox refuses to start as root (CI, containers).
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def instrument(report: Path, dest: Path) -> Path:
    page = report.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", page, re.IGNORECASE)
    page = (page[:head.end()] + HEAD_SCRIPT + page[head.end():]) if head else HEAD_SCRIPT + page
    end = page.lower().rfind("</body>")
    page = (page[:end] + TAIL_SCRIPT + page[end:]) if end >= 0 else page + TAIL_SCRIPT
    dest.write_text(page, encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def report(demo_quick) -> Path:
    out, r = demo_quick  # the demo run shared with test_cli_core (conftest)
    assert r.returncode == 0, r.stderr
    path = out / "report.html"
    assert path.is_file() and path.stat().st_size > 0
    return path


@pytest.fixture(scope="module")
def checks(report, tmp_path_factory):
    """checks(width) -> the JSON the tail script wrote, plus the CONSOLE lines of Chromium's log."""
    # The instrumented copy sits next to report.html so that any relative links resolve the same.
    page = instrument(report, report.with_name("report.bdl-check.html"))
    done: dict[int, dict] = {}

    def run(width: int) -> dict:
        if width not in done:
            profile = tmp_path_factory.mktemp(f"chromium-{width}")
            proc = chromium([f"--window-size={width},{HEIGHT}", "--virtual-time-budget=5000",
                             "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()], profile)
            found = re.search(r'<pre id="bdl-check"[^>]*>(.*?)</pre>', proc.stdout, re.DOTALL)
            assert found, (f"no check results in the DOM (chromium exit {proc.returncode}); "
                           f"stderr tail:\n{proc.stderr[-2000:]}")
            result = json.loads(html.unescape(found.group(1)))
            result["console_log"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
            done[width] = result
        return done[width]

    return run


def test_images_decode(checks):
    res = checks(WIDE)
    assert res["images"], "the report shows no <img> at all"
    broken = [img for img in res["images"] if not img["ok"]]
    assert not broken, f"{len(broken)} of {len(res['images'])} images did not decode: {broken}"
    assert not res["resource_errors"], f"resources failed to load: {res['resource_errors']}"


def test_no_console_errors(checks):
    res = checks(WIDE)
    uncaught = [line for line in res["console_log"] if "Uncaught" in line]
    assert not res["errors"] and not uncaught, (
        f"console errors: {res['errors'] + uncaught}\nChromium console log: {res['console_log']}")


@pytest.mark.parametrize("width", [WIDE, NARROW])
def test_nothing_wider_than_the_page(checks, width):
    res = checks(width)
    wide = res["overflow"]
    listing = "\n".join(f"  {w['element']}: right {w['right']} px (its box: {w['box_right']} px), "
                        f"width {w['width']} px, text {w['text']!r}" for w in wide[:30])
    assert not wide and res["scrollWidth"] <= res["clientWidth"] + 1, (
        f"at {width} px ({res['clientWidth']} px client width, {res['scrollWidth']} px scroll width) "
        f"{len(wide)} elements stick out:\n{listing}")


def test_screenshot(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = chromium([f"--window-size={WIDE},{HEIGHT}", "--virtual-time-budget=5000",
                     f"--screenshot={shot}", report.as_uri()], tmp_path / "profile")
    assert shot.is_file() and shot.stat().st_size > 0, (
        f"no screenshot (chromium exit {proc.returncode}); stderr tail:\n{proc.stderr[-2000:]}")
    with Image.open(shot) as img:
        img.load()
        assert img.size == (WIDE, HEIGHT)
