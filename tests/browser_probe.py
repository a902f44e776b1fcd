"""Renders an HTML file in headless Chromium and reads back, from the DOM, which parts are visible.

The probe is a copy of the page with a small script appended that measures,
for each CSS selector, whether a matching element exists and is laid out
visibly (non-zero box, not display:none / visibility:hidden), and writes the
result into an attribute of <body>; ``chromium --dump-dom`` prints the DOM
after the script ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run")

_SCRIPT = """<script>
(function () {
  var sels = %s, out = {};
  sels.forEach(function (s) {
    var els = Array.prototype.slice.call(document.querySelectorAll(s));
    out[s] = els.some(function (e) {
      var r = e.getBoundingClientRect(), st = getComputedStyle(e);
      return r.width > 0 && r.height > 0 && st.display !== 'none' && st.visibility !== 'hidden';
    });
  });
  var imgs = Array.prototype.slice.call(document.images);
  out['img loaded'] = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-probe', JSON.stringify(out));
})();
</script>"""


def find_chromium() -> tuple[str | None, str]:
    """(path, why-not). Installs Debian's chromium with apt-get when absent and we are root."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name), ""
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it with apt-get needs root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-300:]}"
    path = shutil.which("chromium")
    return (path, "") if path else (None, "apt-get install chromium left no chromium binary")


def probe(html_path: str, selectors: list[str], chromium: str, timeout: int = 120) -> dict:
    """{selector: visible?, 'img loaded': bool} for the page at html_path."""
    with open(html_path) as f:
        page = f.read()
    script = _SCRIPT % json.dumps(selectors)
    page = page.replace("</body>", script + "</body>") if "</body>" in page else page + script
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = os.path.join(os.path.dirname(os.path.abspath(html_path)),
                                  f".probe-{os.getpid()}.html")
        try:
            with open(probe_path, "w") as f:
                f.write(page)
            proc = subprocess.run([chromium, *FLAGS, f"--user-data-dir={tmp}", "--dump-dom",
                                   "file://" + probe_path], capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            os.remove(probe_path)
    m = re.search(r"data-probe=\"([^\"]*)\"", proc.stdout)
    if not m:
        raise AssertionError(f"chromium rendered no probe result (rc {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
    return json.loads(m.group(1).replace("&quot;", '"'))
