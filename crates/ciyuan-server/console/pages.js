// The console's pages. Each is `{ id, scopes, render({ who, params }) }`: it reads
// what it shows from /api/v1 and answers an element. A page is offered only to keys
// with one of its scopes, and the forms on it only to keys that may use them; the API
// refuses anything else anyway.

import { allows, api, ApiError } from "./api.js";
import { h, go } from "./app.js";
import { money, num, t, when, language } from "./i18n.js";
import { verifyProof } from "./proof.js";
import { dayStart, ymd } from "./time.js";

const has = allows;

/** An account path as the API's URL paths take it (the root is `/`, slashes kept). */
function enc(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

/** The page's node: `?account=` when given, else the key's own. */
function nodeOf(who, params) {
  return params.get("account") || who.account;
}

async function accountInfo(path) {
  if (path === "/") return { path: "/" };
  return api("GET", `/api/v1/accounts/${enc(path)}`);
}

/** The time zone of a node: its own, else the nearest ancestor's, else UTC. */
async function zoneOf(path) {
  let p = path;
  while (p && p !== "/") {
    try {
      const a = await accountInfo(p);
      if (a.time_zone) return a.time_zone;
    } catch (e) {
      // An ancestor above the key's subtree is not ours to read: the zone is UTC then.
      if (!(e instanceof ApiError) || e.status !== 403) throw e;
      break;
    }
    p = p.includes("/") ? p.slice(0, p.lastIndexOf("/")) : "/";
  }
  return "UTC";
}

function costText(cost) {
  if (!cost) return "";
  return Object.entries(cost)
    .map(([cur, amt]) => money(amt, cur))
    .join(" + ");
}

function table(headers, rows, opts = {}) {
  if (!rows.length) return h("p", { class: "muted" }, t("none"));
  return h(
    "table",
    { id: opts.id },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col", class: x.num ? "num" : null }, x.label ?? x)))),
    h(
      "tbody",
      {},
      rows.map((r) => h("tr", {}, r.map((c, i) => h("td", { class: headers[i]?.num ? "num" : null }, c)))),
    ),
  );
}

function card(label, value, sub, id) {
  return h("div", { class: "card", id }, h("div", { class: "label" }, label), h("div", { class: "value" }, value), sub ? h("div", { class: "sub" }, sub) : null);
}

function usageUrl(q) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== undefined && v !== null && v !== "") p.set(k, v);
  return `/api/v1/usage?${p}`;
}

function sumCost(rows) {
  const out = {};
  for (const r of rows) for (const [cur, amt] of Object.entries(r.cost || {})) out[cur] = addDecimal(out[cur] || "0", amt);
  return out;
}

/** Adds two decimal strings exactly (money never goes through a float here). */
export function addDecimal(a, b) {
  const scale = Math.max((a.split(".")[1] || "").length, (b.split(".")[1] || "").length);
  const toInt = (s) => {
    const neg = s.startsWith("-");
    const [i, f = ""] = s.replace("-", "").split(".");
    const v = BigInt(i + f.padEnd(scale, "0"));
    return neg ? -v : v;
  };
  const v = toInt(a) + toInt(b);
  const neg = v < 0n;
  let s = (neg ? -v : v).toString().padStart(scale + 1, "0");
  if (scale) s = `${s.slice(0, -scale)}.${s.slice(-scale)}`;
  return (neg ? "-" : "") + s;
}

function nodeForm(who, params, page, extra = []) {
  const input = h("input", { id: "node", name: "account", value: nodeOf(who, params), size: 30 });
  const form = h("form", { class: "inline", id: "node-form" }, h("label", {}, t("account"), input), extra, h("button", { type: "submit" }, t("show")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = Object.fromEntries(new FormData(form).entries());
    go(page, q);
  });
  return form;
}

// ---------------------------------------------------------------- Overview

async function overview({ who, params }) {
  const node = nodeOf(who, params);
  const tz = await zoneOf(node);
  const now = new Date();
  const today = ymd(now, tz);
  const monthFrom = dayStart(`${today.slice(0, 7)}-01`, tz);
  const todayFrom = dayStart(today, tz);
  const [todayU, monthU, byAccount, byModel, byService, incidents, budgets, wallets] = await Promise.all([
    api("GET", usageUrl({ account: node, from: todayFrom, with: "cost", tz })),
    api("GET", usageUrl({ account: node, from: monthFrom, with: "cost", tz })),
    // The children's subtrees (and the node's own usage): one rollup row each.
    api("GET", usageUrl({ account: node, from: monthFrom, group_by: "child", with: "cost", tz })),
    api("GET", usageUrl({ account: node, from: monthFrom, group_by: "model", with: "cost", tz })),
    api("GET", usageUrl({ account: node, from: monthFrom, group_by: "service", with: "cost", tz })),
    api("GET", `/api/v1/incidents?account=${encodeURIComponent(node)}&limit=10`),
    api("GET", `/api/v1/budgets/${enc(node)}`),
    api("GET", `/api/v1/wallets/${enc(node)}?limit=1`).catch(() => ({ wallets: [] })),
  ]);
  const total = (u) => u.rows.reduce((n, r) => n + BigInt(r.total), 0n);
  const top = (u, key) =>
    table(
      [t(key), { label: t("tokens"), num: true }, { label: t("cost"), num: true }],
      [...u.rows]
        .sort((a, b) => (BigInt(b.total) > BigInt(a.total) ? 1 : -1))
        .slice(0, 5)
        .map((r) => [r[key] ?? "", num(BigInt(r.total)), costText(r.cost)]),
      { id: `top-${key}` },
    );
  const alerts = [];
  for (const l of budgets.limits || []) {
    const base = l.cost ? Number(l.cost.amount) : l.amount;
    const used = l.cost ? Number(l.cost.used) : Number(l.used);
    const pct = base > 0 ? (100 * used) / base : 0;
    const crossed = (l.thresholds || []).filter((x) => pct >= x);
    if (crossed.length) alerts.push([l.node, l.limit, `${Math.floor(pct)}% ≥ ${Math.max(...crossed)}%`]);
  }
  for (const w of wallets.wallets || []) {
    // Compared as the decimal string it is: empty or overdrawn.
    if (w.balance.startsWith("-") || /^0(\.0*)?$/.test(w.balance)) alerts.push([w.node, t("wallet"), money(w.balance, w.currency)]);
  }
  return h(
    "div",
    {},
    nodeForm(who, params, "overview"),
    h(
      "div",
      { class: "cards" },
      card(t("today"), num(total(todayU)), costText(todayU.cost_totals), "today"),
      card(t("thisMonth"), num(total(monthU)), costText(monthU.cost_totals), "month"),
    ),
    h("h2", {}, t("topAccounts")),
    top(byAccount, "account"),
    h("h2", {}, t("topModels")),
    top(byModel, "model"),
    h("h2", {}, t("topServices")),
    top(byService, "service"),
    h("h2", {}, t("alerts")),
    table([t("account"), t("limit"), t("status")], alerts, { id: "alerts" }),
    h("h2", {}, t("openIncidents")),
    table(
      [t("time"), t("account"), t("kind"), t("detail")],
      incidents.rows.map((r) => [when(r.ts, tz), r.account, r.body.kind ?? r.body.type ?? "", r.body.message ?? JSON.stringify(r.body)]),
      { id: "incidents" },
    ),
  );
}

// ---------------------------------------------------------------- Accounts

async function accounts({ who, params }) {
  const node = params.get("path") || who.account;
  const tz = await zoneOf(node);
  // The direct children only, however large their subtrees.
  const under = await api("GET", `/api/v1/accounts?under=${encodeURIComponent(node)}&depth=1&limit=10000`);
  const children = under.accounts;
  const monthFrom = dayStart(`${ymd(new Date(), tz).slice(0, 7)}-01`, tz);
  const usage = await api("GET", usageUrl({ account: node, from: monthFrom, group_by: "child", with: "cost", tz }));
  // Each child's subtree is one row (its rollup); the node's own usage is the row
  // under its own name.
  const roll = new Map(children.map((c) => [c.path, { total: 0n, cost: {} }]));
  let own = { total: 0n, cost: {} };
  for (const r of usage.rows) {
    const child = children.find((c) => r.account === c.path || r.account.startsWith(c.path + "/"));
    const slot = child ? roll.get(child.path) : own;
    slot.total += BigInt(r.total);
    for (const [cur, amt] of Object.entries(r.cost || {})) slot.cost[cur] = addDecimal(slot.cost[cur] || "0", amt);
  }
  const crumbs = h("p", { class: "crumbs" });
  if (node !== "/") {
    const parts = node.split("/");
    const mine = who.account === "/" ? 0 : who.account.split("/").length;
    for (let i = Math.max(mine, 1); i <= parts.length; i++) {
      const p = parts.slice(0, i).join("/");
      crumbs.append(h("a", { href: `#/accounts?path=${encodeURIComponent(p)}` }, parts[i - 1]), " / ");
    }
  }
  const body = h(
    "div",
    {},
    crumbs,
    h("p", {}, `${t("path")}: `, h("strong", { id: "current-node" }, node), ` · ${t("timeZone")}: ${tz}`),
    h("h2", {}, `${t("children")} — ${t("thisMonth")}`),
    table(
      [t("account"), { label: t("tokens"), num: true }, { label: t("cost"), num: true }, ""],
      [
        [h("em", {}, node), num(own.total), costText(own.cost), ""],
        ...children.map((c) => {
          const r = roll.get(c.path);
          return [
            h("a", { href: `#/accounts?path=${encodeURIComponent(c.path)}` }, c.display_name ? `${c.path} (${c.display_name})` : c.path),
            num(r.total),
            costText(r.cost),
            h("a", { href: `#/usage?account=${encodeURIComponent(c.path)}` }, t("usage")),
          ];
        }),
      ],
      { id: "children" },
    ),
  );
  if (has(who, "admin")) {
    const name = h("input", { id: "new-account", name: "name", required: true });
    const zone = h("input", { id: "new-account-tz", name: "time_zone", placeholder: "Asia/Shanghai" });
    const out = h("p", { role: "status", id: "new-account-out" });
    const form = h(
      "form",
      { class: "inline", id: "account-form" },
      h("label", {}, t("name"), name),
      h("label", {}, t("timeZone"), zone),
      h("button", { type: "submit" }, t("create")),
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const path = node === "/" ? name.value : `${node}/${name.value}`;
      try {
        const body = { path };
        if (zone.value) body.time_zone = zone.value;
        await api("POST", "/api/v1/accounts", body);
        go("accounts", { path });
      } catch (e) {
        out.textContent = t("error", { detail: e.message });
        out.className = "error";
      }
    });
    body.append(h("h2", {}, t("newAccount")), form, out);
  }
  return body;
}

/** uPlot options of a time chart of `series` over `xs` (seconds) in `tz`. */
function chartOptions(xs, tz, height, series) {
  return {
    width: Math.min(1150, document.getElementById("main").clientWidth - 30),
    height,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), tz),
    // One bucket alone would stretch over years: give it a day each side.
    scales: xs.length > 1 ? {} : { x: { time: true, range: (_u, lo, hi) => [lo - 86400, hi + 86400] } },
    series: [{}, ...series],
    axes: [{}, { values: (_u, ticks) => ticks.map((v) => new Intl.NumberFormat(language(), { notation: "compact" }).format(v)), size: 60 }],
  };
}

/** A chart of a usage answer bucketed by day: tokens a day, the day's cost in its legend. */
function dailyChart(id, usage, tz) {
  const el = h("div", { class: "chart", id, role: "img", "aria-label": t("history") });
  if (!usage.rows.length || !window.uPlot) {
    el.append(h("p", { class: "muted" }, t("none")));
    return el;
  }
  const xs = usage.rows.map((r) => Date.parse(r.bucket_start) / 1000);
  const tokens = usage.rows.map((r) => Number(r.total));
  const opts = chartOptions(xs, tz, 220, [
    {
      label: t("tokens"),
      stroke: PALETTE[0],
      fill: PALETTE[0] + "55",
      value: (_u, _v, _si, idx) => (idx == null ? "" : `${num(tokens[idx])} · ${costText(usage.rows[idx].cost)}`),
    },
  ]);
  // uPlot measures its container: it is drawn once the page is in the document.
  queueMicrotask(() => requestAnimationFrame(() => new uPlot(opts, [xs, tokens], el)));
  return el;
}

// ---------------------------------------------------------------- Usage explorer

const PALETTE = ["#0b5cad", "#d1495b", "#edae49", "#00798c", "#66a182", "#8e6c8a", "#30638e", "#a05a2c", "#4f6d7a", "#c0c0c0"];

async function usage({ who, params }) {
  const node = nodeOf(who, params);
  const tz = await zoneOf(node);
  const group = params.get("group") || "model";
  const bucket = params.get("bucket") || "day";
  const today = ymd(new Date(), tz);
  const fromDay = params.get("from") || ymd(new Date(Date.now() - 6 * 86400e3), tz);
  const toDay = params.get("to") || "";
  const q = { account: node, bucket, tz, with: "cost", from: dayStart(fromDay, tz) };
  if (toDay) q.to = dayStart(toDay, tz);
  // By account, each child's subtree (its rollup) and the node's own usage.
  if (group !== "token") q.group_by = group === "account" ? "child" : group;
  const u = await api("GET", usageUrl(q));

  // Series: one per group value (or token key), over the buckets.
  // The x axis: every hour or day of the range (empty ones at zero), in seconds.
  const secs = (x) => Date.parse(x) / 1000;
  const have = new Set(u.rows.map((r) => secs(r.bucket_start)));
  const end = toDay ? secs(dayStart(toDay, tz)) : Date.now() / 1000;
  if (bucket === "hour" || bucket === "day") {
    const step = bucket === "hour" ? 3600 : 86400;
    // At most a few thousand points: past that, the buckets with usage only.
    for (let x = secs(q.from); x < end && have.size < 5000; x += step) {
      // Days in zones with summer time are 23 or 25 hours: a day's start is its own.
      have.add(bucket === "day" ? secs(dayStart(ymd(new Date((x + 43200) * 1000), tz), tz)) : x);
    }
  }
  const xs = [...have].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const series = new Map();
  const add = (name, x, n) => {
    if (!series.has(name)) series.set(name, new Array(xs.length).fill(0));
    series.get(name)[index.get(secs(x))] += n;
  };
  // By account, rows are the children of the node shown (and the node's own usage
  // under its own name); `childOf` keeps any deeper name on its child's series.
  const depth = node === "/" ? 0 : node.split("/").length;
  const childOf = (a) => (a === node ? a : a.split("/").slice(0, depth + 1).join("/"));
  for (const r of u.rows) {
    if (group === "token") for (const [k, n] of Object.entries(r.tokens)) add(k, r.bucket_start, Number(n));
    else if (group === "account") add(childOf(r.account), r.bucket_start, Number(r.total));
    else add(r[group] ?? "", r.bucket_start, Number(r.total));
  }
  const names = [...series.keys()].sort((a, b) => series.get(b).reduce((x, y) => x + y, 0) - series.get(a).reduce((x, y) => x + y, 0));

  const form = h(
    "form",
    { class: "inline", id: "usage-form" },
    h("label", {}, t("account"), h("input", { name: "account", id: "usage-account", value: node })),
    h(
      "label",
      {},
      t("groupBy"),
      h(
        "select",
        { name: "group", id: "usage-group" },
        ["model", "service", "account", "token"].map((g) => h("option", { value: g, selected: g === group }, g === "token" ? `${t("tokens")} (modality.direction)` : t(g))),
      ),
    ),
    h("label", {}, t("bucket"), h("select", { name: "bucket", id: "usage-bucket" }, ["hour", "day", "month"].map((b) => h("option", { value: b, selected: b === bucket }, t(b))))),
    h("label", {}, t("from"), h("input", { type: "date", name: "from", id: "usage-from", value: fromDay })),
    h("label", {}, t("to"), h("input", { type: "date", name: "to", id: "usage-to", value: toDay, max: today })),
    h("button", { type: "submit" }, t("show")),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    go("usage", Object.fromEntries([...new FormData(form).entries()].filter(([, v]) => v)));
  });

  const chart = h("div", { class: "chart", id: "usage-chart", role: "img", "aria-label": `${t("usage")}: ${node}` });
  if (u.rows.length && window.uPlot) {
    // Stacked: each series drawn as the running sum of those below it, the largest
    // total at the bottom; the legend shows each series' own value.
    const cum = [];
    let run = new Array(xs.length).fill(0);
    for (const n of names) {
      run = run.map((v, i) => v + series.get(n)[i]);
      cum.push(run);
    }
    const data = [xs, ...cum.slice().reverse()];
    const drawn = names.slice().reverse();
    const opts = chartOptions(
      xs,
      tz,
      320,
      drawn.map((n, i) => {
        const color = PALETTE[(names.length - 1 - i) % PALETTE.length];
        return {
          label: n || "—",
          stroke: color,
          fill: color + "cc",
          value: (_u, _v, _si, idx) => (idx == null ? "" : num(series.get(n)[idx])),
        };
      }),
    );
    // uPlot measures its container: it is drawn once the page is in the document.
    queueMicrotask(() => requestAnimationFrame(() => new uPlot(opts, data, chart)));
  } else {
    chart.append(h("p", { class: "muted" }, t("none")));
  }

  const header = [t("time"), group === "token" ? t("tokens") : t(group), { label: t("tokens"), num: true }, { label: t("cost"), num: true }];
  const rows = [];
  for (const r of u.rows) {
    if (group === "token") for (const [k, n] of Object.entries(r.tokens)) rows.push([r.bucket_start, k, String(n), ""]);
    else rows.push([r.bucket_start, r[group] ?? "", String(r.total), costText(r.cost)]);
  }
  const csv = () => {
    const esc = (s) => (/[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s);
    const head = ["bucket_start", group, "tokens", ...(group === "token" ? [] : ["cost"])];
    const lines = u.rows.flatMap((r) =>
      group === "token"
        ? Object.entries(r.tokens).map(([k, n]) => [r.bucket_start, k, String(n)])
        : [[r.bucket_start, r[group] ?? "", String(r.total), Object.entries(r.cost || {}).map(([c, a]) => `${a} ${c}`).join(" + ")]],
    );
    return [head, ...lines].map((l) => l.map(esc).join(",")).join("\n") + "\n";
  };
  const download = h("button", { type: "button", id: "usage-csv", class: "secondary" }, t("downloadCsv"));
  download.addEventListener("click", () => {
    const url = URL.createObjectURL(new Blob([csv()], { type: "text/csv" }));
    const a = h("a", { href: url, download: `usage-${node.replace(/\//g, "_")}-${fromDay}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
  return h(
    "div",
    {},
    form,
    h("p", { class: "muted" }, `${t("timeZone")}: ${tz}`),
    chart,
    download,
    table(
      header,
      rows.map(([b, g, n, c]) => [when(b, tz), g, num(n), c]),
      { id: "usage-table" },
    ),
  );
}

// ---------------------------------------------------------------- Keys

const SCOPES = ["gateway", "ingest", "read", "admin", "audit"];

async function keys({ who, params }) {
  const node = nodeOf(who, params);
  const list = await api("GET", `/api/v1/keys?account=${encodeURIComponent(node)}&limit=1000`);
  const out = h("div", { id: "key-out", role: "status" });
  const account = h("input", { id: "key-account", name: "account", value: node, required: true });
  const name = h("input", { id: "key-name", name: "name" });
  const boxes = SCOPES.filter((s) => has(who, s)).map((s) =>
    h("label", {}, h("input", { type: "checkbox", name: "scope", value: s, id: `scope-${s}` }), s),
  );
  const form = h(
    "form",
    { class: "inline", id: "key-form" },
    h("label", {}, t("account"), account),
    h("label", {}, t("name"), name),
    h("fieldset", {}, h("legend", {}, t("scopes")), boxes),
    h("button", { type: "submit" }, t("create")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const scopes = [...form.querySelectorAll("input[name=scope]:checked")].map((c) => c.value);
    try {
      const body = { account: account.value, scopes };
      if (name.value) body.name = name.value;
      const k = await api("POST", "/api/v1/keys", body);
      out.replaceChildren(h("p", {}, t("secretOnce")), h("p", { class: "secret", id: "new-secret" }, k.key));
    } catch (e) {
      out.replaceChildren(h("p", { class: "error" }, t("error", { detail: e.message })));
    }
  });
  const rows = list.keys.map((k) => {
    let cell = "";
    if (!k.revoked_at) {
      const b = h("button", { type: "button", class: "danger", id: `revoke-${k.key_id}`, "aria-label": `${t("revoke")} ${k.key_id}` }, t("revoke"));
      let armed = false;
      b.addEventListener("click", async () => {
        // Two presses: the first asks, the second revokes.
        if (!armed) {
          armed = true;
          b.textContent = t("confirmRevoke", { key: k.key_id });
          return;
        }
        try {
          await api("DELETE", `/api/v1/keys/${k.key_id}`);
          go("keys", { account: node, t: Date.now() });
        } catch (e) {
          out.replaceChildren(h("p", { class: "error" }, t("error", { detail: e.message })));
        }
      });
      cell = b;
    }
    return [h("span", { class: "mono" }, k.key_id), k.account, k.scopes.join(", "), k.name ?? "", when(k.created_at), k.revoked_at ? t("revoked") : t("active"), cell];
  });
  return h(
    "div",
    {},
    nodeForm(who, params, "keys"),
    h("h2", {}, t("newKey")),
    form,
    out,
    h("h2", {}, t("keys")),
    table([t("keyId"), t("account"), t("scopes"), t("name"), t("created"), t("status"), ""], rows, { id: "keys-table" }),
  );
}

// ---------------------------------------------------------------- Budgets, access, wallets

function bar(used, reserved, amount, thresholds) {
  const pct = (x) => `${Math.max(0, Math.min(100, amount > 0 ? (100 * x) / amount : 0))}%`;
  return h(
    "div",
    { class: "bar", role: "meter", "aria-valuemin": 0, "aria-valuemax": amount, "aria-valuenow": used },
    h("span", { class: "reserved", style: null }),
    h("span"),
    (thresholds || []).map(() => h("i")),
  );
}

function sizeBar(el, used, reserved, amount, thresholds) {
  const pct = (x) => `${Math.max(0, Math.min(100, amount > 0 ? (100 * x) / amount : 0))}%`;
  // Widths are set through the CSSOM: the policy forbids inline style attributes.
  const [res, u, ...marks] = el.children;
  res.style.width = pct(used + reserved);
  u.style.width = pct(used);
  (thresholds || []).forEach((th, i) => (marks[i].style.left = `${th}%`));
}

async function budgets({ who, params }) {
  const node = nodeOf(who, params);
  const tz = await zoneOf(node);
  // The node's last 30 days by day in its zone: one subtree rollup row a day.
  const since = dayStart(ymd(new Date(Date.now() - 29 * 86400e3), tz), tz);
  const [b, w, incidents, history] = await Promise.all([
    api("GET", `/api/v1/budgets/${enc(node)}`),
    api("GET", `/api/v1/wallets/${enc(node)}?limit=20`).catch((e) => ({ error: e.message, wallets: [], movements: [] })),
    api("GET", `/api/v1/incidents?account=${encodeURIComponent(node)}&limit=20`),
    api("GET", usageUrl({ account: node, from: since, bucket: "day", with: "cost", tz })),
  ]);
  const bars = [];
  const limitRows = (b.limits || []).map((l) => {
    const money_ = l.cost;
    const used = money_ ? Number(money_.used) : Number(l.used);
    const reserved = money_ ? Number(money_.reserved) : Number(l.reserved);
    const amount = money_ ? Number(money_.amount) : Number(l.amount);
    const el = bar(used, reserved, amount, l.thresholds);
    bars.push(() => sizeBar(el, used, reserved, amount, l.thresholds));
    const fmt = (x, m) => (money_ ? money(m, money_.currency) : num(x));
    return [l.node, l.name, l.limit, l.mode, fmt(l.used, money_?.used), fmt(l.reserved, money_?.reserved), fmt(l.remaining, money_?.remaining), el];
  });
  const body = h(
    "div",
    {},
    nodeForm(who, params, "budgets"),
    h("h2", {}, t("limits")),
    table(
      [t("account"), t("name"), t("limit"), t("mode"), { label: t("used"), num: true }, { label: t("reserved"), num: true }, { label: t("remaining"), num: true }, ""],
      limitRows,
      { id: "limits" },
    ),
  );
  requestAnimationFrame(() => bars.forEach((f) => f()));
  body.append(h("h2", {}, t("history")), dailyChart("budget-history", history, tz));
  if (has(who, "admin")) {
    const amount = h("input", { id: "budget-tokens", name: "tokens", type: "number", min: 1, required: true });
    const period = h("select", { id: "budget-period", name: "period" }, ["month", "day", "hour", "lifetime"].map((p) => h("option", { value: p }, p)));
    const mode = h("select", { id: "budget-mode", name: "mode" }, ["hard", "soft"].map((p) => h("option", { value: p }, p)));
    const name = h("input", { id: "budget-name", name: "name", placeholder: "default" });
    const out = h("p", { id: "budget-out", role: "status" });
    const form = h(
      "form",
      { class: "inline", id: "budget-form" },
      h("label", {}, t("name"), name),
      h("label", {}, t("tokens"), amount),
      h("label", {}, t("period"), period),
      h("label", {}, t("mode"), mode),
      h("button", { type: "submit" }, t("save")),
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const body = { tokens: Number(amount.value), period: period.value, mode: mode.value };
        if (name.value) body.name = name.value;
        await api("PUT", `/api/v1/budgets/${enc(node)}`, body);
        go("budgets", { account: node, t: Date.now() });
      } catch (e) {
        out.textContent = t("error", { detail: e.message });
        out.className = "error";
      }
    });
    body.append(h("h2", {}, t("setBudget")), form, out);
  }
  body.append(h("h2", {}, t("accessRules")), table([t("account"), t("allow"), t("deny")], (b.models || []).map((m) => [m.node, (m.allow || []).join(", "), (m.deny || []).join(", ")]), { id: "access" }));
  body.append(
    h("h2", {}, t("openIncidents")),
    table(
      [t("time"), t("account"), t("detail")],
      incidents.rows.map((r) => [when(r.ts), r.account, r.body.message ?? JSON.stringify(r.body)]),
      { id: "budget-incidents" },
    ),
  );
  body.append(h("h2", {}, t("wallet")));
  if (w.error) body.append(h("p", { class: "muted" }, w.error));
  // Money moves into a wallet only from above it: offered to admin keys above the node.
  if (has(who, "admin") && node !== who.account && (who.account === "/" || node.startsWith(who.account + "/"))) {
    const amount = h("input", { id: "topup-amount", name: "amount", inputmode: "decimal", required: true, pattern: "[0-9]+(\\.[0-9]+)?" });
    const currency = h("input", { id: "topup-currency", name: "currency", value: (w.wallets || [])[0]?.currency || "CNY", size: 4, required: true });
    const out = h("p", { id: "topup-out", role: "status" });
    const form = h(
      "form",
      { class: "inline", id: "topup-form" },
      h("label", {}, t("amount"), amount),
      h("label", {}, t("currency"), currency),
      h("button", { type: "submit" }, t("topUp")),
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        // The amount stays a decimal string: money never goes through a float.
        await api("POST", `/api/v1/wallets/${enc(node)}`, { kind: "topup", amount: amount.value, currency: currency.value });
        go("budgets", { account: node, t: Date.now() });
      } catch (e) {
        out.textContent = t("error", { detail: e.message });
        out.className = "error";
      }
    });
    body.append(form, out);
  }
  body.append(
    table(
      [t("account"), t("currency"), { label: t("balance"), num: true }, { label: t("reserved"), num: true }],
      (w.wallets || []).map((x) => [x.node, x.currency, money(x.balance, x.currency), x.reserved ? money(x.reserved, x.currency) : ""]),
      { id: "wallets" },
    ),
    h("h2", {}, t("postings")),
    table(
      [t("time"), t("kind"), t("detail")],
      (w.movements || []).map((m) => [when(m.ts), m.kind ?? "", (m.legs || []).map((l) => `${l.account} ${l.debit !== "0" ? "-" + l.debit : "+" + l.credit}`).join("; ")]),
      { id: "postings" },
    ),
  );
  return body;
}

// ---------------------------------------------------------------- Statements and exports

async function statements({ who, params }) {
  const node = nodeOf(who, params);
  const tz = await zoneOf(node);
  const period = params.get("period") || ymd(new Date(), tz).slice(0, 7);
  const st = await api("GET", `/api/v1/statements/${enc(node)}?period=${period}`);
  const q = `account=${encodeURIComponent(node)}&period=${period}`;
  const links = [
    ["CSV", `/api/v1/statements/${enc(node)}?period=${period}&format=csv`, "statement-csv"],
    ["HTML", `/api/v1/statements/${enc(node)}?period=${period}&format=html`, "statement-html"],
    ["FOCUS", `/api/v1/exports/focus?${q}`, "export-focus"],
    ["Journal", `/api/v1/exports/journal?${q}`, "export-journal"],
    ["Usage", `/api/v1/exports/usage?${q}`, "export-usage"],
  ];
  const lineRows = [...(st.lines || []), ...(st.adjustments || [])].map((l) => [
    l.service || l.category || "",
    l.model || "",
    l.key || "",
    num(String(l.quantity).split(".")[0]),
    l.unit_price != null ? money(l.unit_price, l.currency) : "",
    money(l.amount, l.currency),
  ]);
  const totals = (st.totals || []).map((x) => [x.currency, money(x.subtotal, x.currency), money(x.tax, x.currency), money(x.total, x.currency)]);
  const children = (st.children || []).map((c) => [
    h("a", { href: `#/statements?account=${encodeURIComponent(c.account)}&period=${period}` }, c.account),
    c.totals.map((x) => money(x.subtotal, x.currency)).join(" + "),
  ]);
  const periodInput = h("input", { type: "month", name: "period", id: "statement-period", value: period });
  return h(
    "div",
    {},
    nodeForm(who, params, "statements", [h("label", {}, t("period"), periodInput)]),
    h("p", { id: "statement-head" }, `${t("statement")}: ${node} · ${period} · ${st.time_zone}${st.closed ? " · closed" : ""}`),
    h("h2", {}, t("total")),
    table([t("currency"), { label: t("subtotal"), num: true }, { label: t("tax"), num: true }, { label: t("total"), num: true }], totals, { id: "statement-totals" }),
    h("h2", {}, t("lines")),
    table(
      [t("service"), t("model"), t("tokens"), { label: t("quantity"), num: true }, { label: t("unitPrice"), num: true }, { label: t("amount"), num: true }],
      lineRows,
      { id: "statement-lines" },
    ),
    h("h2", {}, t("children")),
    table([t("account"), { label: t("subtotal"), num: true }], children, { id: "statement-children" }),
    h("h2", {}, t("downloads")),
    h("ul", { id: "downloads" }, links.map(([label, href, id]) => h("li", {}, h("a", { href, id, download: "" }, label)))),
    h("details", {}, h("summary", {}, "JSON"), h("pre", { id: "statement-json" }, JSON.stringify(st, null, 2))),
  );
}

// ---------------------------------------------------------------- Quality

async function quality({ who, params }) {
  const node = nodeOf(who, params);
  const tz = await zoneOf(node);
  const period = params.get("period") || ymd(new Date(), tz).slice(0, 7);
  const r = await api("GET", `/api/v1/quality?account=${encodeURIComponent(node)}&period=${period}&format=json`);
  const ms = (v) => (v === undefined || v === null ? "–" : num(Number(v).toFixed(0)));
  const pct = (v) => (v === undefined || v === null ? "" : ` (${v}%)`);
  const rows = (r.rows || []).map((x) => [
    x.upstream ?? "",
    x.model ?? "",
    num(x.requests ?? 0),
    `${num(x.errors ?? 0)}${pct(x.error_rate_percent)}`,
    `${num(x.cut_streams ?? 0)}${pct(x.cut_stream_rate_percent)}`,
    `${num(x.discrepancies ?? 0)} / ${num(x.recounted ?? 0)}`,
    [x.latency_ms?.p50, x.latency_ms?.p95, x.latency_ms?.p99].map(ms).join(" / "),
    [x.ttft_ms?.p50, x.ttft_ms?.p95].map(ms).join(" / "),
    x.output_tokens_per_sec_p50 != null ? num(x.output_tokens_per_sec_p50) : "",
  ]);
  const periodInput = h("input", { type: "month", name: "period", id: "quality-period", value: period });
  return h(
    "div",
    {},
    nodeForm(who, params, "quality", [h("label", {}, t("period"), periodInput)]),
    table(
      [t("upstream"), t("model"), { label: t("requests"), num: true }, { label: t("errors"), num: true }, { label: t("cut"), num: true }, { label: t("discrepancies"), num: true }, t("latency"), t("ttft"), { label: t("tokensPerSecond"), num: true }],
      rows,
      { id: "quality-table" },
    ),
    h("details", {}, h("summary", {}, "JSON"), h("pre", {}, JSON.stringify(r, null, 2))),
  );
}

// ---------------------------------------------------------------- Audit

async function audit({ params }) {
  const cp = await api("GET", "/api/v1/audit/checkpoint");
  const pinned = localStorage.getItem("ciyuan.verifierKey") || "";
  const vkey = h("input", { id: "verifier-key", name: "vkey", value: pinned, size: 80, placeholder: cp.public_key });
  const pin = h("button", { type: "button", class: "secondary", id: "pin-key" }, t("pin"));
  pin.addEventListener("click", () => localStorage.setItem("ciyuan.verifierKey", vkey.value.trim()));
  const id = h("input", { id: "entry-id", name: "entry", type: "number", min: 0, value: params.get("entry") || Math.max(0, cp.size - 1), required: true });
  const out = h("div", { id: "proof-out", role: "status" });
  const form = h("form", { class: "inline", id: "proof-form" }, h("label", {}, t("entryId"), id), h("button", { type: "submit" }, t("verify")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    out.replaceChildren(h("p", { class: "muted" }, t("loading")));
    const key = vkey.value.trim() || cp.public_key;
    try {
      const p = await api("GET", `/api/v1/audit/entries/${Number(id.value)}/proof`);
      const r = await verifyProof(p, key);
      const yes = (b) => h("strong", { class: b ? "ok" : "error" }, b ? t("yes") : t("no"));
      out.replaceChildren(
        h("p", { id: "proof-verdict", class: r.ok ? "ok" : "error", "data-ok": r.ok ? "1" : "0" }, r.ok ? t("verified") : t("notVerified", { why: "—" })),
        h(
          "ul",
          { class: "steps" },
          h("li", {}, `${t("stepSignature")}: `, yes(r.signature)),
          h("li", {}, `${t("stepLeaf")}: `, yes(r.leaf)),
          h("li", {}, `${t("stepInclusion")}: `, yes(r.inclusion)),
        ),
        h("p", {}, `${t("treeSize")}: ${num(p.tree_size)} · ${t("verifierKey")}: `, h("span", { class: "mono" }, key), vkey.value.trim() ? "" : ` ${t("unpinned")}`),
        h("h2", {}, t("entry")),
        h("pre", { id: "proof-entry" }, p.entry),
      );
    } catch (e) {
      out.replaceChildren(h("p", { id: "proof-verdict", class: "error", "data-ok": "0" }, t("notVerified", { why: e.message })));
    }
  });
  return h(
    "div",
    {},
    h("h2", {}, t("checkpoint")),
    table(
      [t("origin"), { label: t("treeSize"), num: true }, t("rootHash")],
      [[cp.origin, num(cp.size), h("span", { class: "mono", id: "root-hash" }, cp.root_hash)]],
      { id: "checkpoint" },
    ),
    h("pre", { id: "checkpoint-note" }, cp.checkpoint),
    h("form", { class: "stack" }, h("label", { for: "verifier-key" }, t("verifierKey")), vkey, h("span", { class: "muted" }, t("verifierHelp")), pin),
    h("h2", {}, t("verify")),
    form,
    out,
  );
}

export const PAGES = [
  { id: "overview", scopes: ["read"], render: overview },
  { id: "accounts", scopes: ["read"], render: accounts },
  { id: "usage", scopes: ["read"], render: usage },
  { id: "keys", scopes: ["admin"], render: keys },
  { id: "budgets", scopes: ["read"], render: budgets },
  { id: "statements", scopes: ["read"], render: statements },
  { id: "quality", scopes: ["read"], render: quality },
  { id: "audit", scopes: ["audit"], render: audit },
];
