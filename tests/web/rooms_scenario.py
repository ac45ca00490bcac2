#!/usr/bin/env python3
"""The room management page (/rooms) in a real browser (Debian's chromium via Playwright).

alice logs in (after one wrong password), creates a room, renames it and makes it members
only, adds bob as a member, then searches the history of --search-room (a members-only room
of hers, not bob's) for "budget" and for a word no message has; bob logs in and finds no
room to manage, is refused alice's room's settings and the search of her room. Screenshots
of every step go to --shots. On success prints one JSON line

    {"wrong_password_refused": true, "created": "ROOM", "renamed": true, "members_only": true,
     "bob_member": true, "search_hits": ["...", ...], "search_nothing": true,
     "bob_refused": true, "bob_search_refused": true}

and exits 0; on failure prints "error: ..." to stderr and exits non-zero.

Usage:
    python3 tests/web/rooms_scenario.py --url https://127.0.0.1:5280 --shots target/rooms
"""

import argparse
import asyncio
import json
import os
import sys

from playwright.async_api import async_playwright, TimeoutError as PlaywrightTimeout


class ScenarioFailure(Exception):
    pass


async def scenario(a: argparse.Namespace) -> dict:
    n = 0

    async def shot(page, name):
        nonlocal n
        n += 1
        await page.screenshot(path=os.path.join(a.shots, f"{n:02d}-{name}.png"), full_page=True)

    async def expect(page, text, what):
        try:
            await page.get_by_text(text).first.wait_for(timeout=a.step_timeout * 1000)
        except PlaywrightTimeout:
            await shot(page, "failed")
            raise ScenarioFailure(f"{what}: {text!r} not on the page")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=a.chromium,
                                          args=["--no-sandbox", "--ignore-certificate-errors"])
        try:
            alice = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await alice.goto(f"{a.url}/rooms")
            await alice.fill("input[name=user]", "alice")
            await alice.fill("input[name=password]", "wrong")
            await alice.click("button[type=submit]")
            await expect(alice, "Wrong user name or password", "a wrong password")
            await shot(alice, "wrong-password")
            await alice.fill("input[name=user]", "alice")
            await alice.fill("input[name=password]", a.alice_password)
            await alice.click("button[type=submit]")
            # Her list holds the room of the history search, made before by an XMPP client.
            await expect(alice, a.search_room, "alice's list")
            await alice.fill("input[name=local]", "planning")
            await alice.fill("input[name=name]", "Planning")
            await alice.fill("textarea[name=description]", "Where we plan")
            await alice.click("button:has-text('Create')")
            await expect(alice, "Room planning@", "the new room's page")
            await shot(alice, "created")
            room = alice.url.split("room=")[1]
            await alice.fill("input[name='muc#roomconfig_roomname']", "Quarterly planning")
            await alice.check("input[name='muc#roomconfig_membersonly']")
            await alice.click("button:has-text('Save')")
            await expect(alice, "Saved.", "saving the settings")
            renamed = await alice.input_value("input[name='muc#roomconfig_roomname']") == "Quarterly planning"
            members_only = await alice.is_checked("input[name='muc#roomconfig_membersonly']")
            await alice.fill("input[type=text][name=jid]", "bob@localhost")
            await alice.select_option("select[name=affiliation]", "member")
            await alice.click("button:has-text('Add')")
            await expect(alice, "bob@localhost is now member.", "adding bob")
            await shot(alice, "bob-added")
            await alice.goto(f"{a.url}/rooms")
            await expect(alice, "Quarterly planning", "the renamed room in alice's list")
            await shot(alice, "list")

            # The history search, from the list's link.
            await alice.click("a:has-text('Search a room')")
            await alice.fill("input[name=room]", a.search_room)
            await alice.fill("input[name=q]", "budget")
            await alice.click("button:has-text('Search')")
            await expect(alice, "messages match", "the search's answer")
            await shot(alice, "search-budget")
            search_hits = [await c.inner_text() for c in
                           await alice.locator("table tr td:nth-child(3)").all()]
            await alice.fill("input[name=q]", "xylophone")
            await alice.click("button:has-text('Search')")
            await expect(alice, "No message matches", "a search that finds nothing")
            await shot(alice, "search-nothing")

            bob = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await bob.goto(f"{a.url}/rooms")
            await bob.fill("input[name=user]", "bob")
            await bob.fill("input[name=password]", a.bob_password)
            await bob.click("button[type=submit]")
            await expect(bob, "You manage no room yet", "bob's list")
            await bob.goto(f"{a.url}/rooms/edit?room={room}")
            await expect(bob, "forbidden", "bob opening alice's room")
            await shot(bob, "bob-refused")
            await bob.goto(f"{a.url}/rooms/search?room={a.search_room}&q=budget")
            await expect(bob, "only members may read", "bob searching alice's members-only room")
            await shot(bob, "bob-search-refused")
            return {"wrong_password_refused": True, "created": room, "renamed": renamed,
                    "members_only": members_only, "bob_member": True,
                    "search_hits": search_hits, "search_nothing": True,
                    "bob_refused": True, "bob_search_refused": True}
        finally:
            await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="https://HOST:PORT, no trailing slash")
    parser.add_argument("--shots", required=True)
    parser.add_argument("--alice-password", default="alice-pw")
    parser.add_argument("--bob-password", default="bob-pw")
    parser.add_argument("--search-room", required=True,
                        help="a members-only room of alice's whose history mentions 'budget'")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--step-timeout", type=float, default=15.0)
    a = parser.parse_args()
    os.makedirs(a.shots, exist_ok=True)
    try:
        result = asyncio.run(asyncio.wait_for(scenario(a), a.timeout))
    except asyncio.TimeoutError:
        print(f"error: the scenario did not finish within {a.timeout} s", file=sys.stderr)
        return 2
    except ScenarioFailure as exc:
        print(f"error: {exc} (screenshots in {a.shots})", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
