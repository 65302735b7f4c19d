#!/usr/bin/env python3
"""Loads gpunorm's browser page (target/web/, from scripts/build_web.sh) in headless Chromium and
checks what it renders: the worked example's numbers, and a large batch whose error against the
f64 reference is below 1e-4 on every backend shown (WebGPU too, with GPUNORM_REQUIRE_GPU=1).
Saves a screenshot to target/web-page.png. Exits non-zero on any failure.

Talks to ChromeDriver over its WebDriver HTTP API with the standard library alone; Chromium
starts with the flags of scripts/webdriver.json, which the wasm-bindgen tests use too. Every
address is on 127.0.0.1, and every wait is bounded.
"""

import base64
import functools
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "target", "web")
SCREENSHOT = os.path.join(ROOT, "target", "web-page.png")
PAGE_TIMEOUT_S = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(port):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=SITE)
    handler.extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",
        ".js": "text/javascript",
    }
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Driver:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["value"]

    def start(self, options):
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = "/session/" + self.call("POST", "/session", caps)["sessionId"]

    def run(self, script):
        return self.call("POST", self.session + "/execute/sync", {"script": script, "args": []})


def main():
    require_gpu = os.environ.get("GPUNORM_REQUIRE_GPU") == "1"
    with open(os.path.join(ROOT, "scripts", "webdriver.json")) as f:
        options = json.load(f)["goog:chromeOptions"]
    options["args"] += ["--headless", "--no-sandbox", "--disable-dev-shm-usage",
                        "--window-size=1100,1900"]
    site_port, driver_port = free_port(), free_port()
    server = serve(site_port)
    chromedriver = subprocess.Popen(
        [os.environ.get("CHROMEDRIVER", "chromedriver"), f"--port={driver_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = Driver(driver_port)
    failures = []
    try:
        for _ in range(100):
            try:
                driver.call("GET", "/status", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        driver.start(options)
        driver.call("POST", driver.session + "/url", {"url": f"http://127.0.0.1:{site_port}/"})
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline and state not in ("done", "failed"):
            time.sleep(0.5)
            state = driver.run("return document.body.dataset.state || ''")
        text = driver.run("return document.body.innerText")
        tables = driver.run(
            "const t = {}; for (const table of document.querySelectorAll('table'))"
            " t[table.id] = Array.from(table.rows, r => Array.from(r.cells, c => c.innerText));"
            " return t;")
        png = driver.call("GET", driver.session + "/screenshot")
        with open(SCREENSHOT, "wb") as f:
            f.write(base64.b64decode(png))
        print(text)
        print(f"screenshot: {SCREENSHOT}")

        def check(ok, what):
            print(("ok      " if ok else "FAILED  ") + what)
            if not ok:
                failures.append(what)

        check(state == "done", f"the page finished (state {state!r})")
        rows = {r[0]: r[1:] for r in tables.get("layer-norm", [])}
        check(rows.get("I", [None, None])[1] == "[-1.22, 0.00, 1.22]",
              f"LayerNorm of \"I\" is [-1.22, 0.00, 1.22] (got {rows.get('I')})")
        check(rows.get("<pad>", [None, None])[1] == "[0.00, 0.00, 0.00]",
              f"LayerNorm of the padding is [0.00, 0.00, 0.00] (got {rows.get('<pad>')})")
        rows = {r[0]: r[1:] for r in tables.get("batch-norm", [])}
        check(rows.get("mean", [])[1:] == ["3.50", "4.00"],
              f"BatchNorm mean 3.50 counting the padding, 4.00 masked (got {rows.get('mean')})")
        check(rows.get("std", [])[1:] == ["2.29", "2.00"],
              f"BatchNorm std 2.29 counting the padding, 2.00 masked (got {rows.get('std')})")
        check(rows.get("<pad>", [])[2:] == ["0.00"],
              f"the masked padding's BatchNorm output is 0 (got {rows.get('<pad>')})")
        batch = tables.get("large-batch", [])[1:]
        backends = [r[0] for r in batch]
        check(any(b.startswith("CPU") for b in backends), "the large batch ran on the CPU")
        if require_gpu:
            check("WebGPU" in backends, "the large batch ran on WebGPU (GPUNORM_REQUIRE_GPU=1)")
        for row in batch:
            m = re.fullmatch(r"max error (\S+)", row[2])
            err = float(m.group(1)) if m else float("inf")
            check(err < 1e-4, f"{row[0]}: max error {err:.1e} < 1e-4 ({row[1]})")
    finally:
        if driver.session:
            try:
                driver.call("DELETE", driver.session, timeout=10)
            except OSError:
                pass
        chromedriver.terminate()
        chromedriver.wait(timeout=10)
        server.shutdown()
    if failures:
        print(f"page test: {len(failures)} check(s) failed")
        return 1
    print("page test: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
