#!/usr/bin/env python3
"""XEP-0363 HTTP File Upload scenario run by an independent XMPP client (slixmpp).

Connects with STARTTLS, joins a room, uploads --file through slixmpp's xep_0363 plugin (which
finds the upload service by disco, asks for a slot and PUTs the bytes over HTTPS), then posts
the file's URL in the room as body and XEP-0066 out-of-band data and waits for the reflection.
On success prints one JSON line

    {"url": GET URL, "upload_s": seconds the upload took, "max_file_size": bytes, "reflected": body}

and exits 0. Any failure prints "error: ..." to stderr and exits non-zero. HTTPS is verified
against the certificate in --ca (the test server's self-signed one).

Usage:
    pip install -r tests/interop/requirements.txt
    python3 tests/interop/upload_scenario.py --jid alice@localhost --password secret \
        --host 127.0.0.1 --port 5222 --room lobby@conference.localhost --nick alice \
        --file report.pdf --ca data/tls/cert.pem
"""

import argparse
import asyncio
import json
import logging
import os
import ssl
import sys
import time

import slixmpp
from slixmpp import JID


class ScenarioFailure(Exception):
    """A step of the scenario failed; the message says which and why."""


class Scenario(slixmpp.ClientXMPP):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.jid, args.password)
        self.args = args
        self.room = JID(args.room)
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for plugin in ("xep_0030", "xep_0045", "xep_0066", "xep_0363"):
            self.register_plugin(plugin)
        self.outcome: asyncio.Future = self.loop.create_future()
        self.reflection: asyncio.Future = self.loop.create_future()
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("failed_all_auth", lambda _e: self.fail("authentication failed"))
        self.add_event_handler("groupchat_message", self.on_groupchat)

    def fail(self, message: str) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(ScenarioFailure(message))

    def on_groupchat(self, msg) -> None:
        if msg["from"].bare == self.room.bare and msg["id"] == "file-post":
            if not self.reflection.done():
                self.reflection.set_result(msg)

    async def on_session_start(self, _event) -> None:
        try:
            result = await self.scenario()
        except ScenarioFailure as exc:
            self.fail(str(exc))
        except Exception as exc:  # any library error is a failed step, reported as such
            self.fail(f"{type(exc).__name__}: {exc}")
        else:
            if not self.outcome.done():
                self.outcome.set_result(result)

    async def scenario(self) -> dict:
        self.send_presence()
        await self.plugin["xep_0045"].join_muc_wait(
            self.room, self.args.nick, maxstanzas=0, timeout=self.args.step_timeout
        )
        started = time.monotonic()
        url = await self.plugin["xep_0363"].upload_file(
            self.args.file,
            content_type=self.args.content_type,
            timeout=self.args.step_timeout,
        )
        upload_s = time.monotonic() - started
        msg = self.make_message(mto=self.room, mbody=url, mtype="groupchat")
        msg["id"] = "file-post"
        msg["oob"]["url"] = url
        msg.send()
        echo = await asyncio.wait_for(self.reflection, self.args.step_timeout)
        if echo["type"] == "error":
            raise ScenarioFailure(f"the message with the link was refused: {echo['error']}")
        return {
            "url": url,
            "upload_s": upload_s,
            "max_file_size": self.plugin["xep_0363"].max_file_size,
            "reflected": echo["body"],
        }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("--jid", "--password", "--host", "--room", "--nick", "--file", "--ca"):
        parser.add_argument(name, required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--timeout", type=float, default=60.0, help="whole scenario, seconds")
    parser.add_argument("--step-timeout", type=float, default=30.0, help="each wait, seconds")
    parser.add_argument("--verbose", action="store_true", help="slixmpp debug logging")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # aiohttp verifies HTTPS with the default context, which reads this file.
    os.environ["SSL_CERT_FILE"] = args.ca
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    xmpp = Scenario(args)
    xmpp.connect(host=args.host, port=args.port)
    try:
        result = xmpp.loop.run_until_complete(asyncio.wait_for(xmpp.outcome, args.timeout))
    except asyncio.TimeoutError:
        print(f"error: scenario did not finish within {args.timeout} s", file=sys.stderr)
        return 2
    except ScenarioFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    try:
        xmpp.loop.run_until_complete(asyncio.wait_for(xmpp.disconnect(wait=2.0), 5))
    except Exception:  # the result is already printed; a messy close must not turn it into a failure
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
