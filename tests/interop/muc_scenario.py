#!/usr/bin/env python3
"""MUC + MAM interop scenario run by an independent XMPP client (slixmpp).

Connects with STARTTLS (certificate verification disabled: test servers use self-signed
certificates), joins a room, sends one groupchat message per --messages entry and waits for
each reflection, then reads the room's MAM archive (XEP-0313). On success prints one JSON line

    {"reflected": [bodies], "mam": [bodies], "stanza_ids": [ids], "mam_ids": [ids]}

and exits 0. "reflected" and "stanza_ids" are in send order; "mam" and "mam_ids" hold the whole
archive, oldest first, so a caller checks that the sent bodies appear at its end and that each
stanza id from a reflection is the archive id of the same message.
Any failure, or no result within --timeout seconds (default 30), prints "error: ..." to stderr
and exits non-zero.

Usage:
    pip install -r tests/interop/requirements.txt
    python3 tests/interop/muc_scenario.py --jid alice@localhost --password secret \
        --host 127.0.0.1 --port 5222 --room lobby@conference.localhost --nick alice \
        --messages one,two,three
"""

import argparse
import asyncio
import json
import logging
import ssl
import sys

import slixmpp
from slixmpp import JID

SID_NS = "urn:xmpp:sid:0"


class ScenarioFailure(Exception):
    """A step of the scenario failed; the message says which and why."""


class Scenario(slixmpp.ClientXMPP):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.jid, args.password)
        self.args = args
        self.room = JID(args.room)
        # Only STARTTLS: the brief is to exercise the c2s STARTTLS path, and slixmpp would
        # otherwise try direct TLS on the same port first and wait for it to fail.
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        # Test servers present throw-away self-signed certificates.
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for plugin in ("xep_0030", "xep_0045", "xep_0059", "xep_0199", "xep_0313", "xep_0359"):
            self.register_plugin(plugin)
        self.outcome: asyncio.Future = self.loop.create_future()
        self.waiting: dict[str, asyncio.Future] = {}
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("failed_all_auth", self.on_failed_auth)
        self.add_event_handler("groupchat_message", self.on_groupchat)
        self.add_event_handler("stream_error", self.on_stream_error)
        self.add_event_handler("connection_failed", self.on_connection_failed)

    def fail(self, message: str) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(ScenarioFailure(message))

    def on_failed_auth(self, _event) -> None:
        self.fail("authentication failed")

    def on_connection_failed(self, error) -> None:
        # slixmpp would retry forever; for a test a refused connection is a clear failure.
        self.fail(f"cannot connect to {self.args.host}:{self.args.port}: {error}")

    def on_stream_error(self, error) -> None:
        self.fail(f"stream error: {error['condition']} {error['text']}")

    def on_groupchat(self, msg) -> None:
        if msg["from"].bare != self.room.bare:
            return
        # A reflection carries our message id, or at least our origin-id (XEP-0359).
        origin = msg.xml.find(f"{{{SID_NS}}}origin-id")
        for key in (msg["id"], origin.get("id") if origin is not None else None):
            future = self.waiting.get(key) if key else None
            if future is not None and not future.done():
                future.set_result(msg)
                return

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
        if self.transport.get_extra_info("ssl_object") is None:
            raise ScenarioFailure("the stream is not encrypted after STARTTLS")
        self.send_presence()
        try:
            await self.plugin["xep_0045"].join_muc_wait(
                self.room, self.args.nick, maxstanzas=0, timeout=self.args.step_timeout
            )
        except asyncio.TimeoutError:
            raise ScenarioFailure(f"no self-presence from {self.room} after joining")

        reflected, stanza_ids = [], []
        for body in self.args.messages:
            message_id = self.new_id()
            future = self.loop.create_future()
            self.waiting[message_id] = future
            msg = self.make_message(mto=self.room, mbody=body, mtype="groupchat")
            msg["id"] = message_id
            msg["origin_id"]["id"] = message_id
            msg.send()
            try:
                echo = await asyncio.wait_for(future, self.args.step_timeout)
            except asyncio.TimeoutError:
                raise ScenarioFailure(f"no reflection of message {body!r} ({message_id})")
            if echo["type"] == "error":
                raise ScenarioFailure(f"message {body!r} rejected: {echo['error']}")
            reflected.append(echo["body"])
            ids = [
                s.get("id")
                for s in echo.xml.findall(f"{{{SID_NS}}}stanza-id")
                if JID(s.get("by", "")).bare == self.room.bare
            ]
            if not ids:
                raise ScenarioFailure(f"reflection of {body!r} has no stanza-id by the room")
            stanza_ids.append(ids[0])

        mam, mam_ids = [], []
        results = self.plugin["xep_0313"].iterate(jid=self.room, rsm={"max": 50})
        async for result in results:
            mam_result = result["mam_result"]
            mam.append(mam_result["forwarded"]["stanza"]["body"])
            mam_ids.append(mam_result["id"])
        return {"reflected": reflected, "mam": mam, "stanza_ids": stanza_ids, "mam_ids": mam_ids}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jid", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--room", required=True, help="room JID, e.g. lobby@conference.localhost")
    parser.add_argument("--nick", required=True)
    parser.add_argument(
        "--messages",
        default="one,two,three",
        type=lambda s: [m for m in s.split(",") if m],
        help="comma-separated message bodies (default: one,two,three)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="whole scenario, seconds")
    parser.add_argument("--step-timeout", type=float, default=10.0, help="each wait, seconds")
    parser.add_argument("--verbose", action="store_true", help="slixmpp debug logging")
    args = parser.parse_args()
    if not args.messages:
        parser.error("--messages needs at least one body")
    return args


def main() -> int:
    args = parse_args()
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
