"""Drives headless Chromium through the console of a running `ciyuan serve`.

Usage: console_check.py URL ADMIN_KEY SCREENSHOT_DIR

Signs in with each role (root admin, an account owner, a reader, an auditor), walks the
main flows, checks what each role must not see or do, and saves a screenshot of every
page. Prints one line per check; exits non-zero at the first failure.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL, ADMIN, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(SHOTS, exist_ok=True)


# The browser's profile is removed when the script ends, passed or failed (registered
# before the browser starts, so it runs after the browser's own exit handlers).
PROFILE = tempfile.mkdtemp(prefix="ciyuan-chromium-")
atexit.register(shutil.rmtree, PROFILE, ignore_errors=True)


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        "--lang=en-US",
        f"--user-data-dir={PROFILE}",
    ]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))


d = browser()
wait = WebDriverWait(d, 20)


def check(cond, what):
    if not cond:
        shot("failure")
        logs = d.get_log("browser")
        raise SystemExit(f"FAILED: {what}\nbrowser console: {json.dumps(logs, indent=1)}")
    print(f"ok: {what}", flush=True)


def shot(name):
    d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def ready(page):
    try:
        wait.until(
            lambda d: d.execute_script(
                "const m = document.getElementById('main');"
                "return m.dataset.ready === '1' && m.dataset.page === arguments[0];",
                page,
            )
        )
    except TimeoutException:
        check(False, f"page {page} rendered ({d.find_element(By.ID, 'main').text[:300]!r})")
    errors = d.find_elements(By.CSS_SELECTOR, "main > p.error")
    check(not errors, f"page {page} has no error" + (f": {errors[0].text}" if errors else ""))


def open_page(page, **params):
    params["t"] = str(time.time())
    q = "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in params.items())
    d.execute_script("document.getElementById('main').dataset.ready = ''; location.hash = arguments[0];", f"#/{page}?{q}")
    ready(page)


def sign_in(key):
    d.get(URL + "/console/")
    field = wait.until(lambda d: d.find_element(By.ID, "key"))
    field.send_keys(key)
    d.find_element(By.ID, "signin-submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#nav a"))
    return [a.get_attribute("id")[4:] for a in d.find_elements(By.CSS_SELECTOR, "#nav a")]


def sign_out():
    d.find_element(By.ID, "signout").click()
    wait.until(lambda d: d.find_elements(By.ID, "key"))


def fetch(method, path, body=None, csrf=True):
    """A request from the page itself (its cookie; the CSRF token unless told not to)."""
    return d.execute_async_script(
        """
        const [method, path, body, csrf, done] = arguments;
        const headers = {"content-type": "application/json"};
        const go = async () => {
          if (csrf) {
            const who = await (await fetch("/api/v1/sessions/current")).json();
            headers["x-csrf-token"] = who.csrf_token;
          }
          const r = await fetch(path, {method, headers, body: body === null ? undefined : JSON.stringify(body)});
          done({status: r.status, body: await r.text()});
        };
        go().catch((e) => done({status: -1, body: String(e)}));
        """,
        method,
        path,
        body,
        csrf,
    )


def create_account(parent, name, tz=None):
    open_page("accounts", path=parent)
    d.find_element(By.ID, "new-account").send_keys(name)
    if tz:
        d.find_element(By.ID, "new-account-tz").send_keys(tz)
    d.find_element(By.CSS_SELECTOR, "#account-form button").click()
    want = name if parent == "/" else f"{parent}/{name}"
    wait.until(lambda d: d.execute_script("const e = document.getElementById('current-node'); return e && e.textContent;") == want)
    ready("accounts")
    check(True, f"account {want} created in the console")


def create_key(account, scopes):
    open_page("keys", account=account)
    acc = d.find_element(By.ID, "key-account")
    acc.clear()
    acc.send_keys(account)
    for s in scopes:
        d.find_element(By.ID, f"scope-{s}").click()
    d.find_element(By.CSS_SELECTOR, "#key-form button").click()
    secret = wait.until(lambda d: d.find_elements(By.ID, "new-secret")) [0].text
    check(secret.startswith("cy_"), f"a {'+'.join(scopes)} key for {account} is shown once")
    return secret


d.set_script_timeout(20)

# ------------------------------------------------------------------ root administrator
nav = sign_in(ADMIN)
check(nav == ["overview", "accounts", "usage", "keys", "budgets", "statements", "quality", "audit"], f"the admin sees every page: {nav}")
ready("overview")
shot("admin-overview")
check(d.execute_script("return document.cookie") == "", "the session cookie is HttpOnly (no script reads it)")
check(fetch("POST", "/api/v1/accounts", {"path": "nocsrf"}, csrf=False)["status"] == 403, "a change without the CSRF token is refused")

create_account("/", "acme", "Asia/Shanghai")
create_account("acme", "cn")
create_account("/", "other")
shot("admin-accounts")

owner = create_key("acme", ["admin"])
reader = create_key("acme/cn", ["read"])
auditor = create_key("acme", ["audit"])
gateway = create_key("acme/cn", ["gateway"])
shot("admin-keys")

open_page("budgets", account="acme/cn")
d.find_element(By.ID, "budget-tokens").send_keys("1000000")
d.find_element(By.CSS_SELECTOR, "#budget-form button").click()
wait.until(lambda d: "1000000" in d.find_element(By.ID, "limits").text.replace(",", ""))
ready("budgets")
check("hard" in d.find_element(By.ID, "limits").text, "a budget set in the console shows live")
shot("admin-budgets")

open_page("budgets", account="acme")
d.find_element(By.ID, "topup-amount").send_keys("100.5")
d.find_element(By.CSS_SELECTOR, "#topup-form button").click()
wait.until(lambda d: "100.5" in d.execute_script("const e = document.getElementById('wallets'); return e ? e.textContent : '';"))
ready("budgets")
check(True, "a wallet topped up from above in the console")

# A gateway call, and its usage in the chart.
req = urllib.request.Request(
    URL + "/v1/chat/completions",
    data=json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello console"}]}).encode(),
    headers={"authorization": f"Bearer {gateway}", "content-type": "application/json"},
)
with urllib.request.urlopen(req, timeout=30) as r:
    check(r.status == 200, "a gateway call through acme/cn")
deadline = time.time() + 20
while True:
    open_page("usage", account="acme", group="model", bucket="hour")
    if "gpt-4o" in d.find_element(By.ID, "usage-table").text or time.time() > deadline:
        break
    time.sleep(0.5)
check("gpt-4o" in d.find_element(By.ID, "usage-table").text, "the call is in the usage table")
wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#usage-chart .uplot canvas"))
check("gpt-4o" in d.find_element(By.ID, "usage-chart").text, "the call is a series of the usage chart")
shot("admin-usage")
open_page("usage", account="acme", group="account", bucket="day")
check("acme/cn" in d.find_element(By.ID, "usage-table").text, "usage by child account")
# A zone's midnight on a day its offset changes: New York's 8 March 2026 starts at
# -05:00 (summer time begins at 02:00), not at noon's -04:00.
starts = d.execute_async_script(
    """const done = arguments[arguments.length - 1];
    import('/console/time.js').then((m) => done([
      m.dayStart('2026-03-08', 'America/New_York'),
      m.dayStart('2026-11-01', 'America/New_York'),
      m.dayStart('2026-11-01', 'Asia/Shanghai'),
    ]), (e) => done(String(e)));"""
)
check(starts == ["2026-03-08T00:00:00-05:00", "2026-11-01T00:00:00-04:00", "2026-11-01T00:00:00+08:00"],
      f"a zone's midnight where summer time starts or ends: {starts}")
open_page("overview", account="acme")
check("gpt-4o" in d.find_element(By.ID, "top-model").text, "the overview's top models")
budget_budget = d.find_element(By.ID, "today").text
check(any(c.isdigit() for c in budget_budget), "today's tokens on the overview")
open_page("accounts", path="acme")
check("acme/cn" in d.find_element(By.ID, "children").text, "the account tree rolls up children")
open_page("budgets", account="acme")
wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#budget-history .uplot canvas"))
check(True, "the budgets page charts the node's last 30 days")

open_page("statements", account="acme")
shot("admin-statements")
for link in ["statement-csv", "statement-html", "export-focus", "export-journal"]:
    href = d.find_element(By.ID, link).get_attribute("href")
    r = fetch("GET", href, csrf=False)
    check(r["status"] == 200, f"the statement page's {link} download answers ({r['status']})")
open_page("quality", account="acme")
check("gpt-4o" in d.find_element(By.ID, "quality-table").text, "the quality page lists the model")
shot("admin-quality")

r = fetch("GET", "/api/v1/accounts/acme/cn", csrf=False)
cn_entry = json.loads(r["body"])["created_entry"]
open_page("audit")
d.find_element(By.ID, "proof-form").find_element(By.TAG_NAME, "button").click()
wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#proof-verdict"))
check(d.find_element(By.ID, "proof-verdict").get_attribute("data-ok") == "1", "the latest entry's proof verifies in the browser")
shot("admin-audit")
# The browser's check can fail: a changed entry does not verify.
tampered = d.execute_async_script(
    """
    const done = arguments[0];
    (async () => {
      const { verifyProof } = await import("/console/proof.js");
      const p = await (await fetch("/api/v1/audit/entries/0/proof")).json();
      const good = await verifyProof(p, p.public_key);
      p.entry = p.entry.replace("}", " }");
      const bad = await verifyProof(p, p.public_key);
      done([good.ok, bad.ok, bad.leaf, bad.inclusion]);
    })().catch((e) => done(String(e)));
    """
)
check(tampered == [True, False, False, False], f"a tampered entry fails the browser's check: {tampered}")

# Language: zh-CN from the switch.
from selenium.webdriver.support.ui import Select

Select(d.find_element(By.ID, "lang")).select_by_value("zh-CN")
wait.until(lambda d: d.find_element(By.ID, "nav-overview").text == "概览")
open_page("overview", account="acme")
check(d.find_element(By.ID, "page-title").text == "概览", "the console speaks Chinese")
shot("admin-overview-zh")
Select(d.find_element(By.ID, "lang")).select_by_value("en")
sign_out()
check(fetch("GET", "/api/v1/accounts", csrf=False)["status"] == 401, "signed out: the session is over")

# ------------------------------------------------------------------ account owner (admin of acme)
nav = sign_in(owner)
check("keys" in nav and "audit" not in nav, f"the owner sees keys, not audit: {nav}")
ready("overview")
shot("owner-overview")
open_page("keys", account="acme")
keys_text = d.find_element(By.ID, "keys-table").text
check(gateway[3:15] in keys_text and ADMIN[3:15] not in keys_text, "the owner lists its subtree's keys only")
extra = create_key("acme/cn", ["read"])
open_page("keys", account="acme/cn")
button = d.find_element(By.ID, f"revoke-{extra[3:15]}")
button.click()
button.click()
wait.until(lambda d: not d.find_elements(By.ID, f"revoke-{extra[3:15]}"))
ready("keys")
check("revoked" in d.find_element(By.ID, "keys-table").text, "the owner revoked a key")
shot("owner-keys")
check(fetch("GET", "/api/v1/accounts/other", csrf=False)["status"] == 403, "the owner cannot read outside acme")
check(fetch("POST", "/api/v1/accounts", {"path": "other/x"})["status"] == 403, "the owner cannot create outside acme")
open_page("accounts", path="acme")
shot("owner-accounts")
sign_out()

# ------------------------------------------------------------------ reader of acme/cn
nav = sign_in(reader)
check(nav == ["overview", "accounts", "usage", "budgets", "statements", "quality"], f"the reader's pages: {nav}")
ready("overview")
shot("reader-overview")
d.execute_script("location.hash = '#/keys'")
wait.until(lambda d: d.find_elements(By.ID, "forbidden"))
check(True, "the reader is not offered the keys page")
open_page("budgets")
check(not d.find_elements(By.ID, "budget-form"), "the reader gets no budget form")
check("1000000" in d.find_element(By.ID, "limits").text.replace(",", ""), "the reader sees its budget")
shot("reader-budgets")
open_page("accounts")
check(not d.find_elements(By.ID, "account-form"), "the reader gets no account form")
check(fetch("POST", "/api/v1/accounts", {"path": "acme/cn/x"})["status"] == 403, "the API refuses the reader's change anyway")
check(fetch("GET", "/api/v1/usage?account=acme", csrf=False)["status"] == 403, "the reader cannot read above acme/cn")
open_page("usage")
shot("reader-usage")
sign_out()

# ------------------------------------------------------------------ auditor of acme
nav = sign_in(auditor)
check(nav == ["audit"], f"the auditor sees the audit page only: {nav}")
ready("audit")
entry = d.find_element(By.ID, "entry-id")
entry.clear()
entry.send_keys(str(cn_entry))
d.find_element(By.ID, "proof-form").find_element(By.TAG_NAME, "button").click()
wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#proof-verdict"))
check(d.find_element(By.ID, "proof-verdict").get_attribute("data-ok") == "1", f"the auditor verifies entry {cn_entry} in the browser")
check("acme/cn" in d.find_element(By.ID, "proof-entry").text, "the proven entry is shown")
shot("auditor-audit")
check(fetch("GET", "/api/v1/usage", csrf=False)["status"] == 403, "the auditor cannot read usage")
d.execute_script("location.hash = '#/overview'")
wait.until(lambda d: d.find_elements(By.ID, "forbidden"))
check(True, "the auditor is not offered the overview")
sign_out()

d.quit()
print("console check passed")
