#!/usr/bin/env python3
"""Bookmarks interop scenario, run with slixmpp's own plugins (an independent client).

Connects with STARTTLS (certificate verification disabled: test servers use self-signed
certificates), publishes a XEP-0402 bookmark through XEP-0060 with the publish-options
XEP-0402 asks for, reads it back three ways — XEP-0402 items, XEP-0048 through private XML
storage (XEP-0049) and XEP-0048 through PEP (XEP-0223) — then writes a new XEP-0048 list
through PEP and reads the XEP-0402 items again. On success prints one JSON line

    {"modern": [ids], "private": [jids], "pep": [jids], "after_legacy_write": [ids]}

and exits 0; on failure prints "error: ..." to stderr and exits non-zero.

Usage:
    pip install -r tests/interop/requirements.txt
    python3 tests/interop/bookmarks_scenario.py --jid alice@localhost --password secret \\
        --host 127.0.0.1 --port 5222
"""

import argparse
import asyncio
import json
import logging
import ssl
import sys

import slixmpp
from slixmpp.plugins.xep_0048.stanza import Bookmarks
from slixmpp.plugins.xep_0402.stanza import Conference

BOOKMARKS2 = "urn:xmpp:bookmarks:1"


class ScenarioFailure(Exception):
    """A step of the scenario failed; the message says which and why."""


class Scenario(slixmpp.ClientXMPP):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.jid, args.password)
        self.args = args
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        for plugin in ("xep_0004", "xep_0030", "xep_0048", "xep_0049", "xep_0060",
                       "xep_0163", "xep_0223", "xep_0402"):
            self.register_plugin(plugin)
        self.outcome: asyncio.Future = self.loop.create_future()
        self.add_event_handler("session_start", self.on_session_start)
        self.add_event_handler("failed_all_auth", lambda _e: self.fail("authentication failed"))
        self.add_event_handler("connection_failed", lambda e: self.fail(f"cannot connect: {e}"))

    def fail(self, message: str) -> None:
        if not self.outcome.done():
            self.outcome.set_exception(ScenarioFailure(message))

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

    async def modern_ids(self) -> list[str]:
        result = await self.plugin["xep_0060"].get_items(self.boundjid.bare, BOOKMARKS2)
        return sorted(item["id"] for item in result["pubsub"]["items"])

    async def scenario(self) -> dict:
        t = self.args.step_timeout
        conference = Conference()
        conference["name"] = "Lobby"
        conference["autojoin"] = True
        conference["nick"] = "sli"
        form = self.plugin["xep_0004"].make_form(ftype="submit")
        form.add_field(var="FORM_TYPE", ftype="hidden",
                       value="http://jabber.org/protocol/pubsub#publish-options")
        form.add_field(var="pubsub#persist_items", value="true")
        form.add_field(var="pubsub#max_items", value="max")
        form.add_field(var="pubsub#send_last_published_item", value="never")
        form.add_field(var="pubsub#access_model", value="whitelist")
        await self.plugin["xep_0060"].publish(
            self.boundjid.bare, BOOKMARKS2, id="lobby@conference.localhost",
            payload=conference, options=form, timeout=t)
        modern = await self.modern_ids()

        private = await self.plugin["xep_0048"].get_bookmarks(method="xep_0049", timeout=t)
        private_jids = [str(c["jid"]) for c in private["private"]["bookmarks"]["conferences"]]

        pep = await self.plugin["xep_0048"].get_bookmarks(method="xep_0223", timeout=t)
        items = list(pep["pubsub"]["items"])
        if len(items) != 1:
            raise ScenarioFailure(f"storage:bookmarks has {len(items)} items, expected 1")
        storage = items[0].xml.find("{storage:bookmarks}storage")
        pep_jids = [c.get("jid") for c in storage.findall("{storage:bookmarks}conference")]

        new = Bookmarks()
        new.add_conference("dev@conference.localhost", "sli", name="Dev", autojoin=True)
        new.add_conference("ops@conference.localhost", "sli", name="Ops")
        await self.plugin["xep_0048"].set_bookmarks(new, method="xep_0223", timeout=t)
        after = await self.modern_ids()
        return {"modern": modern, "private": private_jids, "pep": pep_jids,
                "after_legacy_write": after}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jid", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", required=True, type=int)
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
