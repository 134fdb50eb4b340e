#!/usr/bin/env python3
"""The dashboard in a real browser: headless Chromium (Debian's, never a
downloaded one) driven by Playwright's sync API against a running mesh.

e2e/tests/dashboard_browser.rs starts the mesh with `trellis up`, runs this
script and acts on the lines it prints that start with `@@ ` (its only
protocol with the driver):

  @@ ready: load            start the load through the edge now
  @@ ready: kill INSTANCE   SIGKILL that instance's service process now

Every wait is bounded (at most --wait seconds). A failing step prints what
it looked for and what it saw, saves fail-<step>.png, and the script exits
1. Screenshots of the main views go to --artefacts.

Run by hand against a mesh started with `trellis up`:

  target/pytools/bin/python e2e/browser/dashboard_test.py \\
      --url http://127.0.0.1:PORT --api-key KEY --artefacts /tmp/shots --no-driver
"""

import argparse
import os
import re
import secrets
import sys
import time
import traceback
from pathlib import Path

# The services of the repository's trellis.toml.
DEFAULT_SERVICES = "user,usage,settlement,archive,echo,profile"
CREATE_USER = "telco.user.v1.UserService/CreateUser"
# A method with a numeric field, for the form's own validation.
NUMERIC_METHOD = "trellis.echo.v1.EchoService/Count"
NUMERIC_FIELD = "count"


class StepFailed(Exception):
    """A step did not see what it expected; the message says what it saw."""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the dashboard's base URL, http://127.0.0.1:PORT")
    p.add_argument("--api-key", required=True, help="the TLS edge's API key (trellis up's banner)")
    p.add_argument("--artefacts", required=True, type=Path, help="where screenshots go")
    p.add_argument(
        "--chromium",
        default=os.environ.get("TRELLIS_CHROMIUM", "/usr/bin/chromium"),
        help="the Chromium binary (default $TRELLIS_CHROMIUM, else /usr/bin/chromium)",
    )
    p.add_argument("--services", default=DEFAULT_SERVICES, help="comma-separated mesh services expected healthy")
    p.add_argument("--load-service", default="echo", help="the service the driver loads")
    p.add_argument("--kill-instance", default="echo-1", help="the instance the driver SIGKILLs (trellis up's name)")
    p.add_argument(
        "--kill-address",
        help="its sidecar's inbound address (up.json), which the registry lists: how its row is found",
    )
    p.add_argument("--wait", type=float, default=30.0, help="longest wait of one step, seconds")
    p.add_argument(
        "--no-driver",
        action="store_true",
        help="no driver acts on the @@ lines: skip the load and SIGKILL steps",
    )
    p.add_argument("--readme-shot", type=Path, help="also save the services view at 1280x800 here")
    return p.parse_args()


def announce(what):
    """One protocol line for the driver."""
    print(f"@@ ready: {what}", flush=True)


STARTED = time.monotonic()


def say(text):
    print(f"dashboard_test: [{time.monotonic() - STARTED:5.1f}s] {text}", flush=True)


def rate_value(text):
    """calls/s from a rate cell ("12.5/s", "1.2k/s"); 0 for "–" or empty."""
    m = re.search(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmM]?)", text or "")
    if not m:
        return 0.0
    value = float(m.group(1))
    return value * {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}[m.group(2)]


class Run:
    def __init__(self, args, browser):
        self.args = args
        self.base = args.url.rstrip("/")
        self.ms = int(args.wait * 1000)
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.set_default_timeout(self.ms)
        self.page_errors = []
        self.page = self.new_page()
        self.passed = []

    def new_page(self):
        page = self.context.new_page()
        page.on("pageerror", lambda e: self.page_errors.append(f"{page.url}: {e}"))
        page.on(
            "response",
            lambda r: self.page_errors.append(f"{page.url}: HTTP {r.status} for {r.url}") if r.status >= 400 else None,
        )
        page.on(
            "console",
            lambda m: self.page_errors.append(f"{page.url}: console.{m.type}: {m.text}")
            if m.type == "error"
            else None,
        )
        return page

    def goto(self, path, page=None):
        page = page or self.page
        response = page.goto(self.base + path, wait_until="domcontentloaded")
        if response is None or response.status != 200:
            raise StepFailed(f"GET {path}: expected 200, got {response.status if response else 'no response'}")
        return page

    def shot(self, name, page=None):
        page = page or self.page
        path = self.args.artefacts / name
        page.screenshot(path=str(path), full_page=True)
        say(f"screenshot {path}")

    def wait_fn(self, expression, arg=None, what="", page=None):
        """Waits until `expression` (a JS function of arg) is truthy in the page."""
        page = page or self.page
        try:
            return page.wait_for_function(expression, arg=arg, timeout=self.ms, polling=100)
        except Exception as e:
            raise StepFailed(f"{what}: not so within {self.args.wait:.0f}s ({type(e).__name__})") from None

    def need(self, selector, what, page=None, state="visible"):
        page = page or self.page
        try:
            return page.wait_for_selector(selector, state=state, timeout=self.ms)
        except Exception:
            html = page.content()
            raise StepFailed(
                f"{what}: expected {selector!r} ({state}) on {page.url} within {self.args.wait:.0f}s; "
                f"page is {len(html)} bytes: {html[:600]!r}"
            ) from None

    def text(self, selector, page=None):
        page = page or self.page
        el = page.query_selector(selector)
        return None if el is None else el.inner_text().strip()

    # The steps, in order. Each raises StepFailed with what it saw.

    def services_healthy(self):
        self.goto("/")
        self.need("table#services", "the services table")
        services = [s for s in self.args.services.split(",") if s]
        # Every expected service has a row, and every row is serving.
        seen = self.wait_fn(
            """(names) => {
                const rows = [...document.querySelectorAll('table#services tr[data-service]')];
                const health = Object.fromEntries(rows.map(r => [r.dataset.service,
                    (r.querySelector('td.health') || {}).dataset?.health]));
                const ok = names.every(n => health[n] === 'serving')
                    && rows.every(r => (r.querySelector('td.health') || {}).dataset?.health === 'serving');
                return ok ? health : false;
            }""",
            services,
            what=f"every service row of {services} with td.health[data-health=serving]",
        ).json_value()
        for name in services:
            cell = self.text(f'tr[data-service="{name}"] td.health') or ""
            if not re.search(r"(\d+)/\1 serving", cell):
                raise StepFailed(f'tr[data-service="{name}"] td.health: expected text "N/N serving", seen {cell!r}')
        for col in ("instances", "versions", "zones", "rate", "success", "p50", "p99"):
            if self.page.query_selector(f'tr[data-service="{services[0]}"] td.{col}') is None:
                raise StepFailed(f'tr[data-service="{services[0]}"] has no td.{col}')
        self.need('#source-status[data-state="ok"]', "the registry and metrics sources ok", state="attached")
        say(f"every service serving: {seen}")

    def filters(self):
        """?q= narrows the rows, and the form holds what the URL says."""
        load = self.args.load_service
        other = next(s for s in self.args.services.split(",") if s != load)
        self.goto(f"/?q={load}")
        self.need(f'tr[data-service="{load}"]', f"the {load} row with ?q={load}")
        shown = self.page.locator(f'table#services tr[data-service="{other}"]:visible').count()
        if shown:
            raise StepFailed(f'?q={load}: expected tr[data-service="{other}"] hidden or absent, it is shown')
        q = self.page.input_value("form#filters input[name=q]")
        if q != load:
            raise StepFailed(f"form#filters input[name=q]: expected {load!r} (from the URL), seen {q!r}")
        for name in ("zone", "version"):
            if self.page.query_selector(f"form#filters select[name={name}]") is None:
                raise StepFailed(f"form#filters has no select[name={name}]")

    def metric_moves(self):
        """The load service's rate goes from what it was to a non-zero
        value, on the same page (server-sent events, no reload)."""
        self.goto("/")
        cell = f'tr[data-service="{self.args.load_service}"] td.rate'
        self.need(cell, "the load service's rate cell")
        before = self.text(cell)
        self.page.evaluate("() => { window.__trellisNoReload = 1; }")
        announce("load")
        if self.args.no_driver:
            say("--no-driver: not waiting for the rate to move")
            return
        self.wait_fn(
            """([sel, before]) => {
                const el = document.querySelector(sel);
                if (!el) return false;
                const t = el.innerText.trim();
                const m = t.match(/([0-9]+(?:\\.[0-9]+)?)/);
                return t !== before && m && parseFloat(m[1]) > 0;
            }""",
            [cell, before],
            what=f"{cell} changing from {before!r} to a non-zero rate without a reload",
        )
        after = self.text(cell)
        if self.page.evaluate("() => window.__trellisNoReload") != 1:
            raise StepFailed("the page reloaded while waiting for the rate (expected an in-place update)")
        say(f"{cell}: {before!r} -> {after!r} (in place)")
        if rate_value(after) <= 0:
            raise StepFailed(f"{cell}: expected a non-zero rate, seen {after!r}")

    def screenshot_services(self):
        self.shot("services.png")
        if self.args.readme_shot:
            self.args.readme_shot.parent.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.args.readme_shot), full_page=False)
            say(f"screenshot {self.args.readme_shot} (1280x800)")

    def console(self):
        self.goto(f"/console?method={CREATE_USER}")
        self.need("select#credential-kind", "the credential kind")
        self.page.select_option("select#credential-kind", "api-key")
        self.page.fill("input#credential", self.args.api_key)
        self.page.click("button#sign-in")
        self.need("#signed-in", "the edge accepting the API key")
        self.need("select#method", "the method list", state="attached")
        chosen = self.page.input_value("select#method")
        if chosen != CREATE_USER:
            raise StepFailed(f"select#method: expected {CREATE_USER!r} from ?method=, seen {chosen!r}")
        msisdn = "+49151" + "".join(secrets.choice("0123456789") for _ in range(8))
        values = {"msisdn": msisdn, "name": "Ada Lovelace", "email": f"ada{msisdn[-8:]}@example.com"}
        for field, value in values.items():
            self.need(f'#form [data-field="{field}"]', f"the form's {field} input")
            self.page.fill(f'#form [data-field="{field}"]', value)
        before = self.text("#status")
        self.page.click("button#send")
        # #status holds a placeholder ("–", "…" in flight) until a gRPC
        # status name comes.
        self.wait_fn(
            "() => /^[A-Z][A-Z_]+$/.test((document.querySelector('#status')?.innerText || '').trim())",
            what=f"#status showing the call's outcome (it held {before!r} before)",
        )
        status = self.text("#status")
        response = self.text("#response") or ""
        if "OK" not in status:
            raise StepFailed(f"#status: expected OK after CreateUser, seen {status!r}; #response {response!r}")
        self.wait_fn(
            "(m) => (document.querySelector('#response')?.innerText || '').includes(m)",
            msisdn,
            what=f"#response holding the created user's msisdn {msisdn}",
        )
        response = self.text("#response")
        if not re.search(r'"id"\s*:\s*"[^"]+"', response):
            raise StepFailed(f"#response: expected the created user's id, seen {response!r}")
        for sel in ("#trailers", "#timing"):
            self.need(sel, sel, state="attached")
        for sel, word in (("#copy-grpcurl", "grpcurl"), ("#copy-buf", "buf curl"), ("#copy-curl", "curl")):
            el = self.need(sel, sel, state="attached")
            held = " ".join(
                filter(None, [el.inner_text(), el.get_attribute("data-command") or "", el.get_attribute("value") or ""])
            )
            if word not in held or "CreateUser" not in held:
                raise StepFailed(f"{sel}: expected a {word} command for CreateUser, seen {held[:300]!r}")
        say(f"CreateUser {msisdn}: {status}; {response[:200]!r}")
        self.shot("console.png")
        self.created_msisdn = msisdn

    def console_rejects_bad_input(self):
        """A number field holding text is named in #form-error before
        anything is sent."""
        self.page.select_option("select#method", NUMERIC_METHOD)
        field = f'#form [data-field="{NUMERIC_FIELD}"]'
        self.need(field, f"{NUMERIC_METHOD}'s {NUMERIC_FIELD} input")
        kind = self.page.get_attribute(field, "type") or "text"
        # A type=number input cannot hold text: out of range for uint32 then.
        bad = "abc" if kind != "number" else "99999999999"
        self.page.fill(field, bad)
        self.page.click("button#send")
        self.need("#form-error", "#form-error after an invalid field")
        error = self.text("#form-error")
        if NUMERIC_FIELD not in error:
            raise StepFailed(f"#form-error: expected it to name {NUMERIC_FIELD!r} (input {bad!r}), seen {error!r}")
        say(f"{NUMERIC_FIELD}={bad!r} rejected: {error!r}")

    def service_page(self):
        self.goto("/services/user")
        self.need('table#instances tr[data-instance]', "the user service's instances")
        self.wait_fn(
            """() => [...document.querySelectorAll('table#instances tr[data-instance]')]
                .every(r => r.querySelector('td.health')?.dataset.health === 'SERVING')""",
            what='every tr[data-instance] td.health[data-health="SERVING"] on /services/user',
        )
        row = f'table#methods tr[data-method="{CREATE_USER}"]'
        self.need(row, "CreateUser in the methods table")
        for col in ("rate", "success", "p50", "p99"):
            if self.page.query_selector(f"{row} .{col}") is None:
                raise StepFailed(f"{row} has no .{col}")
        link = self.page.get_attribute(f"{row} a.call", "href") or ""
        if "console" not in link or "CreateUser" not in link:
            raise StepFailed(f"{row} a.call: expected a link to the console for CreateUser, seen href {link!r}")
        self.instance = self.page.get_attribute('table#instances tr[data-instance]', "data-instance")
        self.shot("service.png")

    def instance_page(self):
        self.goto(f"/instances/{self.instance}")
        self.need("#instance", f"instance {self.instance}'s details")
        self.need("#health-history", f"instance {self.instance}'s health history", state="attached")
        self.shot("instance.png")

    def call_map(self):
        self.goto("/map")
        self.need("table#callmap", "the call map")
        for callee in ("user", self.args.load_service) if not self.args.no_driver else ("user",):
            row = f'table#callmap tr[data-caller="edge"][data-callee="{callee}"]'
            self.need(row, f"edge calling {callee}")
            for col in ("rate", "errors"):
                if self.page.query_selector(f"{row} .{col}") is None:
                    raise StepFailed(f"{row} has no .{col}")
        self.shot("callmap.png")

    def registry(self):
        self.goto("/registry")
        self.need("#registry", "the registry view")
        self.need("#config-problems", "the config problems", state="attached")
        self.shot("registry.png")

    def killed_instance_goes_unhealthy(self):
        """The instance's process is SIGKILLed and `trellis up` restarts it
        at once, so NOT_SERVING may last well under a second: a
        MutationObserver in two open pages (the service's instance row and
        the services view) records the moment either shows it, and the
        pages stay open while the driver kills."""
        service = self.args.kill_instance.rsplit("-", 1)[0]
        detail = self.goto(f"/services/{service}", self.new_page())
        self.need("table#instances tr[data-instance]", f"{service}'s instances", page=detail)
        # The registry names instances itself (user-cd7872e983dd94d5); the
        # row of trellis up's echo-1 is the one at its sidecar's address.
        rows = detail.evaluate(
            """() => [...document.querySelectorAll('table#instances tr[data-instance]')]
                .map(r => [r.dataset.instance, (r.querySelector('td.address')?.innerText || '').trim()])"""
        )
        ids = [i for i, addr in rows if addr == self.args.kill_address] if self.args.kill_address else []
        if len(ids) != 1:
            raise StepFailed(
                f"expected one tr[data-instance] on /services/{service} with td.address {self.args.kill_address!r} "
                f"({self.args.kill_instance}'s sidecar), seen (id, address) {rows}"
            )
        instance = ids[0]
        say(f"{self.args.kill_instance} is {instance} in the registry")
        self.need(f'tr[data-instance="{instance}"] td.health[data-health="SERVING"]', f"{instance} serving", page=detail)
        overview = self.goto("/", self.new_page())
        self.need(f'tr[data-service="{service}"] td.health[data-health="serving"]', f"{service} serving", page=overview)
        watch = """([kind, sel]) => {
            window.__trellisSeen = null;
            const check = () => {
                if (window.__trellisSeen) return;
                if (kind === 'instance') {
                    const row = document.querySelector(sel);
                    const h = row?.querySelector('td.health')?.dataset.health;
                    if (!row) window.__trellisSeen = 'row removed';
                    else if (h && h !== 'SERVING') window.__trellisSeen = 'data-health=' + h;
                } else {
                    const h = document.querySelector(sel)?.dataset.health;
                    if (h && h !== 'serving') window.__trellisSeen = 'data-health=' + h;
                }
                if (window.__trellisSeen) window.__trellisSeenAt = Date.now();
            };
            new MutationObserver(check).observe(document.documentElement,
                {subtree: true, childList: true, attributes: true, characterData: true});
        }"""
        detail.evaluate(watch, ["instance", f'tr[data-instance="{instance}"]'])
        overview.evaluate(watch, ["service", f'tr[data-service="{service}"] td.health'])
        announce(f"kill {self.args.kill_instance}")
        deadline = time.monotonic() + self.args.wait
        seen = {}
        while time.monotonic() < deadline:
            for name, page in (("service page", detail), ("services view", overview)):
                got = page.evaluate("() => window.__trellisSeen")
                if got:
                    seen[name] = got
            if seen:
                break
            time.sleep(0.1)
        if not seen:
            raise StepFailed(
                f'after SIGKILL of {instance}: expected tr[data-instance="{instance}"] td.health '
                f'to leave SERVING (or the row to go) on /services/{service}, or tr[data-service="{service}"] '
                f"td.health to leave serving on /, within {self.args.wait:.0f}s; neither page changed"
            )
        say(f"{instance} SIGKILLed: seen on {seen}")
        # Give the other page a moment to show it too, for the report only.
        time.sleep(0.5)
        for name, page in (("service page", detail), ("services view", overview)):
            say(f"  {name}: {page.evaluate('() => window.__trellisSeen') or 'did not change'}")
        # trellis up restarts it: serving again, on the same page.
        self.wait_fn(
            "(sel) => document.querySelector(sel)?.dataset.health === 'SERVING'",
            f'tr[data-instance="{instance}"] td.health',
            what=f"{instance} SERVING again after its restart",
            page=detail,
        )
        say(f"{instance} SERVING again")
        detail.close()
        overview.close()

    def events(self):
        self.goto("/events")
        self.need("table#events", "the event log")
        self.need('table#events tr[data-kind="registered"]', "a registered event", state="attached")
        if not self.args.no_driver:
            service = self.args.kill_instance.rsplit("-", 1)[0]
            row = (
                f'table#events tr[data-service="{service}"]:is([data-kind="health"],'
                f'[data-kind="deregistered"],[data-kind="expired"],[data-kind="replaced"])'
            )
            self.need(row, f"an event of {service} after {self.args.kill_instance} was killed", state="attached")
        self.shot("events.png")

    def steps(self):
        steps = [
            ("services", self.services_healthy),
            ("filters", self.filters),
            ("metric", self.metric_moves),
            ("services-shot", self.screenshot_services),
            ("console", self.console),
            ("console-invalid", self.console_rejects_bad_input),
            ("service", self.service_page),
            ("instance", self.instance_page),
            ("callmap", self.call_map),
            ("registry", self.registry),
        ]
        if not self.args.no_driver:
            steps.append(("sigkill", self.killed_instance_goes_unhealthy))
        steps.append(("events", self.events))
        return steps


def main():
    args = parse_args()
    args.artefacts.mkdir(parents=True, exist_ok=True)
    if not Path(args.chromium).exists():
        sys.exit(
            f"dashboard_test: no Chromium at {args.chromium}: install Debian's chromium "
            "(`apt-get install chromium`) or set TRELLIS_CHROMIUM"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("dashboard_test: Playwright is missing: run scripts/pytools (it installs it into target/pytools)")

    failed = []
    with sync_playwright() as p:
        # Root in a container: Chromium's sandbox needs user namespaces we
        # may not have.
        browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
        run = Run(args, browser)
        for name, step in run.steps():
            started = time.monotonic()
            try:
                step()
                run.passed.append(name)
                say(f"PASS {name} ({time.monotonic() - started:.1f}s)")
            except Exception as e:
                message = str(e) if isinstance(e, StepFailed) else traceback.format_exc()
                failed.append((name, message))
                say(f"FAIL {name}: {message}")
                try:
                    run.page.screenshot(path=str(args.artefacts / f"fail-{name}.png"), full_page=True)
                except Exception:
                    pass
                # Later steps depend on earlier ones only loosely: go on,
                # so one run shows every failure.
        browser.close()
    if run.page_errors:
        say("errors in the pages' console:")
        for e in run.page_errors[:20]:
            say(f"  {e}")
    total = len(run.passed) + len(failed)
    say(f"{len(run.passed)} of {total} steps passed")
    for name, message in failed:
        print(f"FAILED {name}: {message}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
