#!/usr/bin/env python
"""Demo step for the search service: start `tools/serve.py` on a free loopback port, query it over HTTP by text
(when the index's encoder embeds text) and by image, save a screenshot of the search page (when Chromium is
installed), print the results, and stop the server.

  python tools/demo_serve.py demo_out/index_vl --out demo_out/ [--text "a handwritten digit seven"] [--image Q.png]

The image query defaults to the index's first image (fetched from the service itself, /image/INDEX/0).
"""
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from internvit.cli import ArgumentParser, UsageError, existing_dir, existing_file, positive_int, run  # noqa: E402


def _call(url, body=None, timeout=300):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, ctype = r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from None
    return json.loads(raw) if ctype.startswith("application/json") else raw


def _print(title, answer):
    print(f"{title}  (index {answer['index']}, generation {answer['generation']})")
    for rank, h in enumerate(answer["results"], 1):
        label = h.get("caption") or h.get("image_path") or h.get("path") or ""
        print(f"  {rank:>2}  id {h['id']:>5}  {h['score']:+.4f}  {str(label)[:70]}")


def screenshot(url, out_png, text, image_path):
    """The search page after one query, in headless Chromium; returns a message when it cannot."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        return "no screenshot: Chromium is not installed (apt-get install chromium chromium-driver)"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import Select, WebDriverWait
    except ImportError:
        return "no screenshot: selenium is not installed (pip install -r requirements.txt)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="demo-chromium-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_bin))
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "index")).options) >= 1)
        Select(driver.find_element(By.ID, "k")).select_by_visible_text("10")
        if text:
            driver.find_element(By.ID, "text").send_keys(text, Keys.ENTER)
        else:
            driver.find_element(By.ID, "file").send_keys(os.path.abspath(image_path))
        wait.until(lambda d: "results for" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))
        driver.save_screenshot(out_png)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return None


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("index_dir", type=existing_dir)
    p.add_argument("--out", default="demo_out", help="folder for the screenshot (default demo_out/)")
    p.add_argument("--text", default="a handwritten digit seven", help="the text query")
    p.add_argument("--image", type=existing_file, default=None, help="the image query (default: the index's first "
                                                                    "image)")
    p.add_argument("-k", type=positive_int, default=5)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.index_dir, "manifest.json")):
        raise UsageError(f"{args.index_dir}: not an index folder (no manifest.json)")
    os.makedirs(args.out, exist_ok=True)

    # a free loopback port (as retrieval.serve.free_port, without importing the service's web stack here: the
    # server is its own process)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    name = os.path.basename(os.path.normpath(args.index_dir))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), args.index_dir,
                             "--port", str(port), "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                _call(url + "/health", timeout=2)
                break
            except (OSError, RuntimeError):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 300 s") from None
                time.sleep(0.3)
        print(f"serving {name} on {url}/ (python tools/serve.py {args.index_dir})")
        info = _call(url + "/indices")["indices"][0]
        text = args.text if info["text_queries"] else None
        if text:
            _print(f"text query: {text!r}", _call(url + "/search", {"text": text, "k": args.k}))
        else:
            print(f"(index {name}: encoder {info['model']} is image-only, no text query)")
        if args.image:
            with open(args.image, "rb") as f:
                data, label = f.read(), args.image
        else:
            data, label = _call(f"{url}/image/{name}/0"), f"/image/{name}/0"
        answer = _call(url + "/search", {"image": base64.b64encode(data).decode(), "k": args.k})
        _print(f"image query: {label}", answer)
        shot = os.path.join(args.out, "serve_page.png")
        with tempfile.TemporaryDirectory() as tmp:
            query_png = args.image
            if query_png is None:  # the page uploads a file: keep the fetched image in a scratch folder
                query_png = os.path.join(tmp, "query" + (".png" if data[:4] == b"\x89PNG" else ".jpg"))
                with open(query_png, "wb") as f:
                    f.write(data)
            msg = screenshot(url, shot, text, query_png)
        print(msg or f"wrote {shot}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
