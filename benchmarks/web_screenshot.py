"""Regenerate docs/web-page.png: the web page answering a query on the demo's own index.

clipforge-demo                                   # builds runs/demo/index (if not done yet)
python -m benchmarks.web_screenshot [--index runs/demo/index] [--query "a red heart"]

Serves the index on a loopback port, loads ``/?q=QUERY`` in headless Chromium (Debian's
``chromium`` and ``chromium-driver``; selenium from the dev extra), waits until every result
image has loaded, and writes the screenshot atomically. So the picture in the README is what a
user of the current demo sees.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

ALL_IMAGES_LOADED = """
const imgs = [...document.querySelectorAll('#results .hit img')];
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
"""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", default="runs/demo/index", help="INDEX_DIR to serve")
    p.add_argument("--query", default="a red heart", help="the text query shown")
    p.add_argument("--out", default="docs/web-page.png", help="PNG to write")
    p.add_argument("--size", default="1280,900", help="browser window WIDTH,HEIGHT")
    args = p.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from clipforge.data_tools.atomic import atomic_output
    from clipforge.index.server import ServerConfig, create_app, running_server

    chromium = next((x for x in map(shutil.which, ("chromium", "chromium-browser")) if x), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        print("needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
              "chromium-driver)", file=sys.stderr)  # fmt: skip
        return 2
    if not (Path(args.index) / "index.json").is_file():
        print(f"{args.index}: no index.json (run clipforge-demo first)", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory() as profile,
        running_server(create_app(ServerConfig(args.index))) as url,
    ):
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-quic", "--disable-sync",
                     "--disable-component-update", "--disable-dev-shm-usage",
                     "--hide-scrollbars", f"--user-data-dir={profile}",
                     f"--window-size={args.size}"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.get(f"{url}/?q={urllib.parse.quote_plus(args.query)}")
            WebDriverWait(driver, 120).until(lambda d: d.execute_script(ALL_IMAGES_LOADED))
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    with atomic_output(args.out) as tmp:
        tmp.write_bytes(png)
    print(f"{args.out}: {len(png):,} bytes, query {args.query!r} on {args.index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
