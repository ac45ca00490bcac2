#!/usr/bin/env python3
"""XEP-0198 stream management interop scenario, run by slixmpp's own xep_0198 plugin.

Connects with STARTTLS (certificate verification disabled: test servers use self-signed
certificates), lets the plugin enable stream management with resumption, joins a room,
sends a groupchat message and breaks the TCP connection before it reads the reflection.
(The client stops reading first, so the server has written the reflection but the
client never handled it.) It then reconnects: the plugin resumes the session (no new bind, no new join), and the
reflection of the message in flight must arrive on the resumed stream, exactly once.
A message sent after the resumption must be reflected too (same nick, still in the room).
On success prints one JSON line

    {"resumed": true, "in_flight": [bodies], "after": [bodies], "handled": h, "starts": 1}

and exits 0. Any failure, or no result within --timeout seconds (default 30), prints
"error: ..." to stderr and exits non-zero.

Usage:
    pip install -r tests/interop/requirements.txt
    python3 tests/interop/sm_scenario.py --jid alice@localhost --password secret \\
        --host 127.0.0.1 --port 5222 --room lobby@conference.localhost --nick alice
"""

import argparse
import asyncio
import json
import logging
import ssl
import sys

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
        for plugin in ("xep_0030", "xep_0045", "xep_0198", "xep_0199"):
            self.register_plugin(plugin)
        self.outcome: asyncio.Future = self.loop.create_future()
        self.enabled: asyncio.Future = self.loop.create_future()
        self.resumed: asyncio.Future = self.loop.create_future()
        self.starts = 0
        self.bodies: list[str] = []
        self.arrived = asyncio.Event()
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("sm_enabled", self.on_enabled)
        self.add_event_handler("session_resumed", self.on_resumed)
        self.add_event_handler("failed_all_auth", lambda _e: self.fail("authentication failed"))
        self.add_event_handler("groupchat_message", self.on_groupchat)
        self.add_event_handler("stream_error", self.on_stream_error)
        self.add_event_handler("connection_failed", self.on_connection_failed)

    def fail(self, message: str) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(ScenarioFailure(message))

    def on_connection_failed(self, error) -> None:
        self.fail(f"cannot connect to {self.args.host}:{self.args.port}: {error}")

    def on_stream_error(self, error) -> None:
        self.fail(f"stream error: {error['condition']} {error['text']}")

    def on_enabled(self, _stanza) -> None:
        if not self.enabled.done():
            self.enabled.set_result(True)

    def on_resumed(self, _stanza) -> None:
        if not self.resumed.done():
            self.resumed.set_result(True)

    def on_groupchat(self, msg) -> None:
        if msg["from"].bare == self.room.bare and msg["body"]:
            self.bodies.append(msg["body"])
            self.arrived.set()

    async def wait_for_body(self, body: str) -> None:
        deadline = self.loop.time() + self.args.step_timeout
        while body not in self.bodies:
            left = deadline - self.loop.time()
            if left <= 0:
                raise ScenarioFailure(f"no reflection of {body!r}; got {self.bodies}")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def on_session_start(self, _event) -> None:
        self.starts += 1
        if self.starts > 1:
            self.fail("a second session_start: the session was not resumed")
            return
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
        step = self.args.step_timeout
        try:
            await asyncio.wait_for(self.enabled, step)
        except asyncio.TimeoutError:
            raise ScenarioFailure("stream management was not enabled (no <enabled/>)")
        sm = self.plugin["xep_0198"]
        if not sm.sm_id:
            raise ScenarioFailure("the server granted no resumption id")
        self.send_presence()
        try:
            await self.plugin["xep_0045"].join_muc_wait(
                self.room, self.args.nick, maxstanzas=0, timeout=step
            )
        except asyncio.TimeoutError:
            raise ScenarioFailure(f"no self-presence from {self.room} after joining")
        self.send_message(mto=self.room, mbody="settled", mtype="groupchat")
        await self.wait_for_body("settled")

        # Stop reading, send, then cut the connection: the server wrote the reflection,
        # but the client never handled it (it dies in the socket's buffer), so the server
        # must send it again on the resumed stream.
        self.transport.pause_reading()
        self.send_message(mto=self.room, mbody="in flight", mtype="groupchat")
        await asyncio.sleep(0.5)
        self.transport.abort()
        await asyncio.sleep(0.2)
        if "in flight" in self.bodies:
            raise ScenarioFailure("the reflection was read before the connection was cut")
        self.connect(host=self.args.host, port=self.args.port)
        try:
            await asyncio.wait_for(self.resumed, step)
        except asyncio.TimeoutError:
            raise ScenarioFailure("the session was not resumed (no <resumed/>)")
        await self.wait_for_body("in flight")
        self.send_message(mto=self.room, mbody="after", mtype="groupchat")
        await self.wait_for_body("after")
        await asyncio.sleep(0.3)
        return {
            "resumed": True,
            "in_flight": [b for b in self.bodies if b == "in flight"],
            "after": [b for b in self.bodies if b == "after"],
            "handled": sm.handled,
            "starts": self.starts,
        }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jid", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--room", required=True, help="room JID, e.g. lobby@conference.localhost")
    parser.add_argument("--nick", required=True)
    parser.add_argument("--timeout", type=float, default=30.0, help="whole scenario, seconds")
    parser.add_argument("--step-timeout", type=float, default=10.0, help="each wait, seconds")
    parser.add_argument("--verbose", action="store_true", help="slixmpp debug logging")
    return parser.parse_args()


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
