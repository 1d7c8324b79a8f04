"""Open a thetascope report in headless Chromium: take a screenshot and check that every figure rendered.

Usage::

    python scripts/screenshot_report.py runs/report/report.html --png /tmp/report.png

Two Chromium runs: ``--dump-dom`` (after layout) to check that every ``<img>`` is an embedded PNG with a
non-zero
natural size (a small inline check writes the result into the DOM), and ``--screenshot`` for a PNG to look at.
Console errors (``--enable-logging=stderr``) fail the check. Exit status 0 when all is well, 1 otherwise,
2 when Chromium is missing. The page itself must not load anything external; the browser runs with networking
features off and a throw-away profile.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
# Chromium noise that is not about the page (dbus, GPU, crash handler, fontconfig).
_NOISE = re.compile(
    r"dbus|bus\.cc|gpu|viz|crashpad|fontconfig|sandbox|zygote|Fontconfig|ALSA|object_proxy", re.I
)
_CHECK_JS = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !i.complete || i.naturalWidth === 0 || !i.src.startsWith('data:image/png'));
  const div = document.createElement('div');
  div.id = 'ts-check';
  div.textContent = 'TSCHECK images=' + imgs.length + ' broken=' + bad.length;
  document.body.appendChild(div);
});
</script>
"""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def check_report(
    html: Path, png: Path, chromium: str = CHROMIUM, timeout: float = 120.0, height: int = 4000
) -> list[str]:
    """Screenshot ``html`` into ``png`` and return a list of problems (empty when everything rendered).

    Example:
        >>> check_report(Path("runs/report/report.html"), Path("/tmp/r.png"))  # doctest: +SKIP
        []
    """
    problems: list[str] = []
    page = html.read_text(encoding="utf-8")
    n_img = len(re.findall(r"<img\b", page))
    with tempfile.TemporaryDirectory() as tmp:
        # The check script goes into a copy, never into the report itself (the report has no scripts).
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.replace("</body>", _CHECK_JS + "</body>"), encoding="utf-8")
        profile = Path(tmp) / "profile"
        dom = _run(
            [
                chromium,
                *_FLAGS,
                f"--user-data-dir={profile}",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            timeout,
        )
        m = re.search(r"TSCHECK images=(\d+) broken=(\d+)", dom.stdout)
        if not m:
            problems.append(f"could not read the in-page check (exit {dom.returncode}): {dom.stderr[-500:]}")
        else:
            seen, broken = int(m.group(1)), int(m.group(2))
            if seen != n_img:
                problems.append(f"browser saw {seen} images, the page has {n_img}")
            if broken:
                problems.append(f"{broken} image(s) did not render")
        for line in dom.stderr.splitlines():
            if ("CONSOLE" in line or ":ERROR:" in line) and not _NOISE.search(line):
                problems.append(f"console: {line.strip()}")
        shot = _run(
            [
                chromium,
                *_FLAGS,
                f"--user-data-dir={Path(tmp) / 'profile2'}",
                f"--screenshot={png}",
                f"--window-size=1280,{height}",
                html.resolve().as_uri(),
            ],
            timeout,
        )
        if not png.is_file() or png.stat().st_size == 0:
            problems.append(f"no screenshot written (exit {shot.returncode}): {shot.stderr[-500:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("--png", type=Path, default=Path("report-screenshot.png"))
    parser.add_argument("--chromium", default=CHROMIUM)
    parser.add_argument("--height", type=int, default=4000, help="window height in pixels (page length)")
    args = parser.parse_args(argv)
    if not (Path(args.chromium).is_file() or shutil.which(args.chromium)):
        print(f"chromium not found at {args.chromium}", file=sys.stderr)
        return 2
    problems = check_report(args.html, args.png, args.chromium, height=args.height)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"screenshot: {args.png} ({'ok' if not problems else f'{len(problems)} problem(s)'})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
