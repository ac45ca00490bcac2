#!/usr/bin/env python3
"""The web client served by pchat, used in a real browser (Debian's chromium, driven by
Playwright for Python; `playwright install` is not needed: the system browser is used).

Two users in two browser contexts: alice logs in at https://HOST:PORT/, enters a room (which
creates it) and writes; bob logs in, enters the same room and finds alice's message in its
history, then replies, which alice sees. With --deep-room, bob also finds a room whose long
history was written before by searching part of its name in the "add groupchat" box (room
search on the server), enters it from the suggestion (--deep-count messages "deep 000", "deep 001", …): the newest is
shown, and scrolling up loads older pages from the archive (MAM) until the first message
appears, every text shown in order. Then alice opens the page in a fresh browser
context (nothing cached: a reload on another device) and logs in: the room is back in her
list, because Converse.js keeps it as a server-side bookmark, with both messages. A
screenshot of every step goes to --shots. On success prints one JSON line

    {"history_seen_by_bob": true, "reply_seen_by_alice": true, "room_back_after_reload": true,
     "messages_after_reload": [texts],
     "deep": {"found_by_search": "label", "first_seen": true, "scrolls": n, "distinct_seen": n,
              "in_order": true}}

and exits 0; on failure prints "error: ..." to stderr (with the step) and exits non-zero.

Usage:
    pip install playwright && apt-get install -y chromium
    python3 tests/web/web_scenario.py --url https://127.0.0.1:5280/ --shots target/web \\
        --room lobby@conference.localhost
"""

import argparse
import asyncio
import json
import os
import sys

from playwright.async_api import async_playwright, Page, TimeoutError as PlaywrightTimeout


class ScenarioFailure(Exception):
    """A step failed; the message says which."""


class Steps:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = 0
        self.ms = int(args.step_timeout * 1000)

    async def shot(self, page: Page, name: str) -> None:
        self.n += 1
        await page.screenshot(path=os.path.join(self.args.shots, f"{self.n:02d}-{name}.png"))

    async def login(self, page: Page, user: str, password: str) -> None:
        await page.goto(self.args.url)
        await page.fill("#converse-login-jid", user, timeout=self.ms)
        await page.fill("#converse-login-password", password)
        await page.click("button[type=submit].btn-primary")
        try:
            await page.wait_for_selector("text=GROUPCHATS", timeout=self.ms)
        except PlaywrightTimeout:
            await self.shot(page, f"{user}-login-failed")
            raise ScenarioFailure(f"{user} did not get past the login form")

    async def enter_room(self, page: Page, nick: str, room: str = "") -> None:
        await page.goto(f"{self.args.url}#converse/room?jid={room or self.args.room}")
        textarea = page.locator("textarea.chat-textarea")
        nick_input = page.locator("input[name=nick]")
        await page.wait_for_selector("textarea.chat-textarea, input[name=nick]", timeout=self.ms)
        if await nick_input.count() and await nick_input.first.is_visible():
            await nick_input.first.fill(nick)
            await page.click("input[name=join]")
        await textarea.first.wait_for(timeout=self.ms)

    async def say(self, page: Page, text: str) -> None:
        area = page.locator("textarea.chat-textarea").first
        await area.fill(text)
        await area.press("Enter")
        await self.expect_text(page, text, "its own message")

    async def expect_text(self, page: Page, text: str, what: str) -> None:
        try:
            await page.locator(".chat-msg__text", has_text=text).first.wait_for(timeout=self.ms)
        except PlaywrightTimeout:
            await self.shot(page, "missing")
            raise ScenarioFailure(f"{what} ({text!r}) did not appear")

    async def find_and_enter(self, page: Page, room: str, words: str) -> str:
        """Finds a room by searching `words` in the "add groupchat" box and enters it from
        the suggestion; returns the suggestion's text."""
        # The groupchats list's menu, then its "Add groupchat".
        await page.locator("converse-rooms-list converse-dropdown button").first.click()
        await page.locator("converse-rooms-list a.show-add-muc-modal").first.click()
        box = page.locator("converse-add-muc-modal")
        field = box.locator("converse-autocomplete input").first
        await field.wait_for(timeout=self.ms)
        await field.fill(words)
        await field.press("End")  # a key event: the box searches on input
        suggestion = box.locator(".suggestion-box__results li", has_text=room).first
        try:
            await suggestion.wait_for(timeout=self.ms)
        except PlaywrightTimeout:
            await self.shot(page, "room-search-empty")
            raise ScenarioFailure(f"searching {words!r} did not suggest {room}")
        label = (await suggestion.inner_text()).strip()
        await self.shot(page, "bob-room-search")
        await suggestion.dispatch_event("mousedown")
        nick = box.locator("input[name=nickname]")
        if await nick.count() and await nick.first.is_visible() and not await nick.first.input_value():
            await nick.first.fill("bob")
        await box.locator("input[type=submit], button[type=submit]").first.click()
        await page.locator(f"converse-muc[jid='{room}'] textarea.chat-textarea").first.wait_for(timeout=self.ms)
        return label

    async def scroll_to_the_start(self, page: Page, room: str, count: int) -> dict:
        """Scrolls a room's messages up until its first message shows, and checks that what
        was shown on the way came in order. Bounded: at most 60 scrolls."""
        first, last = "deep 000", f"deep {count - 1:03d}"
        await self.expect_text(page, last, "the newest message of the long history")
        await self.shot(page, "bob-deep-room-newest")
        pane = page.locator(f"converse-muc[jid='{room}'] .chat-content__messages").first
        seen: dict[int, None] = {}
        in_order = True
        scrolls = 0
        for scrolls in range(1, 61):
            texts = await pane.locator(".chat-msg__text").all_inner_texts()
            numbers = [int(t.strip()[5:]) for t in texts if t.strip().startswith("deep ")]
            in_order &= numbers == sorted(numbers)
            seen.update((n, None) for n in numbers)
            if 0 in seen:
                break
            # The list runs bottom-up (column-reverse): its top is the most negative scrollTop.
            await pane.evaluate("el => { el.scrollTop = -el.scrollHeight; }")
            await page.wait_for_timeout(400)
        else:
            await self.shot(page, "deep-history-not-reached")
            raise ScenarioFailure(f"{first!r} did not appear after 60 scrolls up (saw {len(seen)} messages)")
        await self.shot(page, "bob-deep-room-first")
        return {
            "first_seen": True,
            "scrolls": scrolls,
            "distinct_seen": len(seen),
            "in_order": in_order,
        }

    async def run(self) -> dict:
        a = self.args
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=a.chromium,
                args=["--no-sandbox", "--ignore-certificate-errors"],
            )
            try:
                return await self.scenario(browser)
            finally:
                await browser.close()

    async def scenario(self, browser) -> dict:
        # Test servers present a self-signed certificate.
        ctx = lambda: browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
        alice_ctx, bob_ctx = await ctx(), await ctx()
        alice, bob = await alice_ctx.new_page(), await bob_ctx.new_page()

        await self.login(alice, "alice", self.args.alice_password)
        await self.enter_room(alice, "alice")
        await self.say(alice, "first from alice")
        await self.shot(alice, "alice-wrote")

        await self.login(bob, "bob", self.args.bob_password)
        await self.enter_room(bob, "bob")
        await self.expect_text(bob, "first from alice", "the room's history at bob")
        await self.shot(bob, "bob-sees-history")
        await self.say(bob, "reply from bob")
        await self.expect_text(alice, "reply from bob", "bob's reply at alice")
        await self.shot(alice, "alice-sees-reply")
        deep = None
        if self.args.deep_room:
            words = self.args.deep_room.split("@")[0][:4].upper()
            label = await self.find_and_enter(bob, self.args.deep_room, words)
            deep = await self.scroll_to_the_start(bob, self.args.deep_room, self.args.deep_count)
            deep["found_by_search"] = label
        await alice_ctx.close()

        # Another device: nothing cached in the browser; the room comes from the server.
        again_ctx = await ctx()
        again = await again_ctx.new_page()
        await self.login(again, "alice", self.args.alice_password)
        room_name = self.args.room.split("@")[0]
        try:
            await again.locator(".list-container--openrooms, converse-rooms-list, #chatrooms", has_text=room_name).first.wait_for(timeout=self.ms)
        except PlaywrightTimeout:
            await self.shot(again, "no-room-after-reload")
            raise ScenarioFailure("the room is not in alice's list on a fresh browser (bookmark)")
        await again.locator(f"a.open-room[data-room-jid='{self.args.room}'], a:has-text('{room_name}')").first.click()
        await self.expect_text(again, "reply from bob", "the history after a reload")
        texts = await again.locator(".chat-msg__text").all_inner_texts()
        await self.shot(again, "alice-after-reload")
        await again_ctx.close()
        await bob_ctx.close()
        return {
            "history_seen_by_bob": True,
            "reply_seen_by_alice": True,
            "room_back_after_reload": True,
            "messages_after_reload": [t.strip() for t in texts],
            "deep": deep,
        }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the server's web page, e.g. https://127.0.0.1:5280/")
    parser.add_argument("--room", required=True, help="room JID, e.g. lobby@conference.localhost")
    parser.add_argument("--shots", required=True, help="directory for the screenshots")
    parser.add_argument("--deep-room", default="", help="a room holding --deep-count messages 'deep NNN'")
    parser.add_argument("--deep-count", type=int, default=0)
    parser.add_argument("--alice-password", default="alice-pw")
    parser.add_argument("--bob-password", default="bob-pw")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=120.0, help="whole scenario, seconds")
    parser.add_argument("--step-timeout", type=float, default=15.0, help="each wait, seconds")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    os.makedirs(args.shots, exist_ok=True)
    try:
        result = asyncio.run(asyncio.wait_for(Steps(args).run(), args.timeout))
    except asyncio.TimeoutError:
        print(f"error: the scenario did not finish within {args.timeout} s", file=sys.stderr)
        return 2
    except ScenarioFailure as exc:
        print(f"error: {exc} (screenshots in {args.shots})", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
