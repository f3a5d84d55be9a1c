// The console's shell: sign-in, navigation by the key's scopes, language, routing.
// Pages live in pages.js; every figure comes from /api/v1 through api.js.

import { allows, signIn, signOut, whoAmI } from "./api.js";
import { LANGUAGES, language, setLanguage, t } from "./i18n.js";
import { PAGES } from "./pages.js";

let who = null;

/** Creates an element: `h("a", {href: "#"}, "text", child)`. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** The pages this key may open, in menu order. */
function allowed() {
  return PAGES.filter((p) => p.scopes.some((s) => allows(who, s)));
}

/** The route in the URL's fragment: `#/usage?account=acme` → ["usage", params]. */
export function route() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [name, query] = raw.split("?");
  return [name || "", new URLSearchParams(query || "")];
}

/** Goes to a page with parameters. */
export function go(name, params = {}) {
  const q = new URLSearchParams(params).toString();
  location.hash = `#/${name}${q ? "?" + q : ""}`;
}

function drawChrome() {
  document.title = t("title");
  document.getElementById("lang-label").textContent = t("language");
  document.getElementById("nav").setAttribute("aria-label", t("nav"));
  const signout = document.getElementById("signout");
  signout.textContent = t("signOut");
  signout.hidden = !who;
  const nav = document.getElementById("nav");
  nav.replaceChildren();
  const whoEl = document.getElementById("who");
  whoEl.textContent = "";
  if (!who) return;
  const [current] = route();
  for (const p of allowed()) {
    nav.append(
      h("a", { href: `#/${p.id}`, id: `nav-${p.id}`, "aria-current": p.id === current ? "page" : null }, t(p.id)),
    );
  }
  whoEl.textContent = t("signedInAs", { key: who.key_id, account: who.account, scopes: who.scopes.join(", ") });
}

function drawSignIn(message) {
  const main = document.getElementById("main");
  const key = h("input", { id: "key", type: "password", autocomplete: "off", spellcheck: "false", required: true, size: 60 });
  const out = h("p", { id: "signin-error", class: "error", role: "alert" }, message || "");
  const form = h(
    "form",
    { class: "stack", id: "signin" },
    h("label", { for: "key" }, t("keyLabel")),
    key,
    h("button", { type: "submit", id: "signin-submit" }, t("signIn")),
    out,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      who = await signIn(key.value.trim());
      key.value = "";
      const first = allowed()[0];
      drawChrome();
      if (first && route()[0] !== first.id && !allowed().some((p) => p.id === route()[0])) go(first.id);
      else render();
    } catch (e) {
      out.textContent = t("error", { detail: e.message });
    }
  });
  main.replaceChildren(h("div", { class: "signin" }, h("h1", {}, t("signInTitle")), h("p", { class: "muted" }, t("signInHelp")), form));
  key.focus();
}

async function render() {
  drawChrome();
  if (!who) return drawSignIn();
  const [name, params] = route();
  const page = allowed().find((p) => p.id === name);
  const main = document.getElementById("main");
  if (!page) {
    const first = allowed()[0];
    if (!first) {
      main.replaceChildren(h("p", { class: "error", id: "no-pages" }, t("forbidden")));
      return;
    }
    if (PAGES.some((p) => p.id === name)) {
      main.replaceChildren(h("p", { class: "error", id: "forbidden" }, t("forbidden")));
      return;
    }
    go(first.id);
    return;
  }
  main.replaceChildren(h("p", { class: "muted" }, t("loading")));
  try {
    const body = await page.render({ who, params });
    if (route()[0] !== name) return;
    main.replaceChildren(h("h1", { id: "page-title" }, t(page.id)), body);
    main.dataset.page = page.id;
    main.dataset.ready = "1";
  } catch (e) {
    if (e.status === 401) {
      who = null;
      return render();
    }
    main.replaceChildren(h("h1", {}, t(page.id)), h("p", { class: "error", role: "alert" }, t("error", { detail: e.message })));
    main.dataset.ready = "1";
  }
}

async function start() {
  const sel = document.getElementById("lang");
  for (const [code, l] of Object.entries(LANGUAGES)) sel.append(h("option", { value: code }, l.name));
  sel.value = language();
  document.documentElement.lang = language();
  sel.addEventListener("change", () => {
    setLanguage(sel.value);
    render();
  });
  document.getElementById("signout").addEventListener("click", async () => {
    await signOut();
    who = null;
    location.hash = "";
    render();
  });
  window.addEventListener("hashchange", () => {
    document.getElementById("main").dataset.ready = "";
    render();
  });
  who = await whoAmI();
  render();
}

start();
