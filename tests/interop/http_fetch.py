#!/usr/bin/env python3
"""One HTTPS request, as a browser or a download tool would make it, for the file tests.

Prints one JSON line: {"status", "headers" (lower-case names), "length", "sha256", "seconds",
"text" (the body when it is short text)}. The server's certificate is verified against --ca.
Credentials for HTTP Basic come from the environment (FETCH_USER, FETCH_PASSWORD), never the
command line. --body-file sends a file as the body (PUT); --length overrides Content-Length.

Usage:
    FETCH_USER=alice@localhost FETCH_PASSWORD=pw python3 tests/interop/http_fetch.py \
        --ca data/tls/cert.pem --url https://localhost:5280/files/ID/name
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--body-file")
    p.add_argument("--length", type=int)
    p.add_argument("--content-type")
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args()
    url = urllib.parse.urlsplit(a.url)
    ctx = ssl.create_default_context(cafile=a.ca)
    conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx, timeout=a.timeout)
    headers = {}
    user, password = os.environ.get("FETCH_USER"), os.environ.get("FETCH_PASSWORD")
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    body = None
    if a.body_file:
        body = open(a.body_file, "rb").read()
        headers["Content-Length"] = str(len(body) if a.length is None else a.length)
    if a.content_type:
        headers["Content-Type"] = a.content_type
    started = time.monotonic()
    conn.putrequest(a.method, url.path + (f"?{url.query}" if url.query else ""))
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body is not None:
        try:
            conn.send(body)
        except OSError:
            pass  # the server may answer and close before the whole body went
    r = conn.getresponse()
    digest, length, first = hashlib.sha256(), 0, b""
    while True:
        chunk = r.read(1 << 16)
        if not chunk:
            break
        if len(first) < 4096:
            first += chunk[: 4096 - len(first)]
        digest.update(chunk)
        length += len(chunk)
    seconds = time.monotonic() - started
    print(json.dumps({
        "status": r.status,
        "headers": {k.lower(): v for k, v in r.getheaders()},
        "length": length,
        "sha256": digest.hexdigest(),
        "seconds": seconds,
        "text": first.decode("utf-8", "replace") if length <= 4096 else "",
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
