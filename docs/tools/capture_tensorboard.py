"""Serve a run's TensorBoard logs locally and capture pages with headless Chromium (Debian's ``chromium``).

    python docs/tools/capture_tensorboard.py runs/quick/version_0 docs/_static/tensorboard

writes one PNG per page (the custom-scalars layout, the scalars, the norm-vs-loss image, the swap's text event).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PAGES = {
    "custom_scalars": "#custom_scalars",
    "scalars": "#scalars&tagFilter=twophase%2F(grad_norm%7Closs%7Cgn_max%7Cthreshold)%24",
    "images": "#images",
    "text": "#text",
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdir")
    parser.add_argument("out_prefix", help="PNG files are written as <out_prefix>_<page>.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", default="1500,1000")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page's scripts")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # let TensorBoard finish reading the event files
        for page, fragment in PAGES.items():
            out = Path(f"{args.out_prefix}_{page}.png")
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        args.chromium,
                        *CHROMIUM_FLAGS,
                        f"--user-data-dir={profile}",
                        f"--window-size={args.size}",
                        f"--virtual-time-budget={args.wait_ms}",
                        f"--screenshot={out.resolve()}",
                        f"http://127.0.0.1:{port}/{fragment}",
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=180,
                )
            print(f"wrote {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
