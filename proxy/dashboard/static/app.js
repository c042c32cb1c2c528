// Bascule's dashboard: polls /dashboard/state every 2 s and renders it.
// Every value from config or discovery is put in the page as text (textContent,
// createTextNode), never as markup, so a name like "<script>" shows as written.
// No inline handlers: the Content-Security-Policy forbids inline script.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "bascule-admin-token";
let timer = null;

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function replaceChildren(node, children) {
  node.replaceChildren(...children);
}

function fact(name, value, cls) {
  return el("div", {}, el("dt", {}, name), el("dd", cls ? { class: cls } : {}, value));
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function banner(text, isError) {
  const node = document.getElementById("banner");
  if (!text) { node.hidden = true; return; }
  node.textContent = text;
  node.className = isError ? "banner error" : "banner";
  node.hidden = false;
}

function fmt(value, digits, suffix) {
  if (value === null || value === undefined) return "–";
  return Number(value).toFixed(digits) + (suffix || "");
}

function when(epochSeconds) {
  if (!epochSeconds) return "–";
  return new Date(epochSeconds * 1000).toLocaleString();
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function backendState(backend) {
  if (backend.drained) return "drained";
  return backend.healthy ? "up" : "down";
}

function renderSummary(doc) {
  const traffic = doc.traffic;
  replaceChildren(document.getElementById("summary"), [
    fact("version", doc.version),
    fact("config", (doc.config.hash || "").slice(0, 12)),
    fact("loaded", when(doc.config.loaded_at)),
    fact("workers", doc.workers),
    fact("answered by", "worker " + doc.worker),
    fact("up for", duration(doc.now - doc.started_at)),
    fact("traffic window", traffic ? duration(traffic.window_s) :
      (doc.metrics ? "starting" : "metrics off")),
  ]);
}

// Backend rows are updated in place (keyed by backend id), not rebuilt, so a button
// under the pointer stays the same element between two polls.
function syncRows(tbody, items, keyOf, cellsOf) {
  const existing = new Map([...tbody.children].map((row) => [row.dataset.key, row]));
  const rows = items.map((item) => {
    const key = keyOf(item);
    const cells = cellsOf(item);
    let row = existing.get(key);
    if (!row || row.children.length !== cells.length) {
      row = el("tr", { data: { key } }, ...cells.map(() => el("td")));
    }
    cells.forEach((cell, i) => {
      const td = row.children[i];
      if (cell instanceof Node) {
        const old = td.firstChild;
        if (!old || old.dataset.sig !== cell.dataset.sig) td.replaceChildren(cell);
        return;
      }
      const [text, cls] = Array.isArray(cell) ? cell : [cell, ""];
      const value = text === null || text === undefined ? "" : String(text);
      if (td.textContent !== value) td.textContent = value;
      if (td.className !== cls) td.className = cls;
    });
    return row;
  });
  // Only move what is out of place: a row that stays keeps its DOM identity.
  rows.forEach((row, i) => {
    if (tbody.children[i] !== row) tbody.insertBefore(row, tbody.children[i] || null);
  });
  while (tbody.children.length > rows.length) tbody.lastChild.remove();
}

function upstreamCard(name) {
  const id = "upstream-" + encodeURIComponent(name);
  let card = document.getElementById(id);
  if (card) return card;
  const numeric = new Set(["Weight", "Ramp", "In flight", "req/s", "Errors", "p50", "p99"]);
  const head = el("tr", {}, ...["Backend", "State", "Reason", "req/s", "Errors", "p50", "p99",
    "In flight", "Weight", "Ramp", "Address", ""].map((h) =>
    el("th", numeric.has(h) ? { class: "num" } : {}, h)));
  card = el("div", { class: "card", id, data: { upstream: name } },
    el("h3", {}, name),
    el("dl", { class: "facts" }),
    el("div", { class: "scroll" },
      el("table", { class: "backends" }, el("thead", {}, head), el("tbody"))));
  return card;
}

function renderUpstreams(doc) {
  const traffic = (doc.traffic && doc.traffic.backends) || {};
  const cards = Object.entries(doc.upstreams).map(([name, up]) => {
    const disco = up.discovery || {};
    const facts = [
      fact("strategy", up.strategy),
      fact("discovery", disco.source + (disco.service ? " " + disco.service : "")),
      fact("index", disco.consul_index ?? disco.version ?? "–"),
      fact("state", disco.stale ? "stale" : "current", disco.stale ? "stale" : ""),
      fact("last success", disco.last_success_age === null || disco.last_success_age === undefined
        ? "–" : duration(disco.last_success_age) + " ago"),
      fact("in flight", traffic[name]
        ? Object.values(traffic[name]).reduce((sum, t) => sum + (t.inflight || 0), 0)
        : up.inflight),
    ];
    if (up.shadow_strategy) facts.push(fact("shadow", up.shadow_strategy));
    if (up.sticky) facts.push(fact("sticky cookie", up.sticky));
    if (up.fleet) {
      facts.push(fact("fleet counts", up.fleet.state === "fleet"
        ? "Redis, " + up.fleet.members + " members" : "local (" + (up.fleet.error || "") + ")",
      up.fleet.state === "fleet" ? "" : "stale"));
    }
    if (disco.error) facts.push(fact("error", disco.error, "stale"));
    if (up.panic) facts.push(fact("panic", "yes", "stale"));
    const card = upstreamCard(name);
    replaceChildren(card.querySelector("dl"), facts);
    syncRows(card.querySelector("tbody"), up.backends, (b) => b.id, (b) => {
      const t = (traffic[name] || {})[b.id] || {};
      const state = backendState(b);
      const action = b.drained ? "enable" : "drain";
      const button = el("button", { type: "button", class: "act",
        data: { action, upstream: name, backend: b.id, sig: action } },
      b.drained ? "Enable" : "Drain");
      return [
        b.id, [state, "state state-" + state], [(b.health && b.health.reason) || "", "reason"],
        [fmt(t.rps, 1), "num"], [t.rps ? fmt(t.error_ratio * 100, 1, "%") : "–", "num"],
        [fmt(t.p50_ms, 1, " ms"), "num"], [fmt(t.p99_ms, 1, " ms"), "num"],
        [t.inflight ?? b.inflight, "num"], [b.weight, "num"],
        [b.ramp < 1 ? fmt(b.ramp * 100, 0, "%") : "–", "num"], [b.address, "addr"], button,
      ];
    });
    return card;
  });
  const holder = document.getElementById("upstreams");
  cards.forEach((card, i) => {
    if (holder.children[i] !== card) holder.insertBefore(card, holder.children[i] || null);
  });
  while (holder.children.length > cards.length) holder.lastChild.remove();
}

function renderRoutes(doc) {
  const traffic = (doc.traffic && doc.traffic.routes) || {};
  const rows = doc.routes.map((r) => {
    const t = (traffic[r.name] || {})[r.upstream] || {};
    return el("tr", {},
      el("td", {}, r.name), el("td", {}, r.host || "*"), el("td", {}, r.path_prefix),
      el("td", {}, r.split ? r.split.map((t) => t.name + " " + t.weight).join(" / ")
        : r.upstream),
      el("td", {}, (r.plugins || []).join(", ") || "–"),
      el("td", { class: "num" }, fmt(t.rps, 1)),
      el("td", { class: "num" }, fmt(t.errors_per_s, 2)),
      el("td", { class: "num" }, fmt(t.p50_ms, 1, " ms")),
      el("td", { class: "num" }, fmt(t.p99_ms, 1, " ms")));
  });
  replaceChildren(document.querySelector("#routes tbody"), rows);
}

function renderCache(doc) {
  const cache = doc.traffic && doc.traffic.cache;
  const facts = [
    fact("hit ratio", cache && cache.hit_ratio !== null ? fmt(cache.hit_ratio * 100, 1, "%") : "–"),
    fact("lookups/s", cache ? fmt(cache.lookups_per_s, 1) : "–"),
  ];
  for (const [name, status] of Object.entries(doc.plugins || {})) {
    if (status.store_state === undefined) continue;
    facts.push(fact(name + " store", status.store + " (breaker " + status.store_state + ")",
      status.store_state.startsWith("open") ? "stale" : ""));
  }
  replaceChildren(document.getElementById("cache"), facts);
}

function renderLists(doc) {
  replaceChildren(document.getElementById("listeners"),
    doc.listeners.map((l) => el("li", {}, l.kind + " ", el("code", {}, l.address))));
  replaceChildren(document.getElementById("plugins"),
    Object.entries(doc.plugins || {}).map(([name, status]) =>
      el("li", {}, el("code", {}, name), " ",
        el("span", { class: "muted" }, Object.entries(status)
          .map(([k, v]) => k + ": " + v).join(", ")))));
  const reloads = doc.reloads || [];
  if (!reloads.length) {
    replaceChildren(document.querySelector("#reloads tbody"), [el("tr", {},
      el("td", { colspan: "5", class: "muted" }, "none since this worker started"))]);
    return;
  }
  replaceChildren(document.querySelector("#reloads tbody"), reloads.map((r) =>
    el("tr", {},
      el("td", {}, when(r.at)),
      el("td", { class: r.result === "success" ? "state-up" : "state-down" }, r.result),
      el("td", {}, r.changed ? "yes" : "no"),
      el("td", {}, (r.hash || "").slice(0, 12)),
      el("td", {}, r.error || ""))));
}

function render(doc) {
  renderSummary(doc);
  renderUpstreams(doc);
  renderRoutes(doc);
  renderCache(doc);
  renderLists(doc);
  document.getElementById("updated").textContent =
    "Updated " + new Date().toLocaleTimeString() + " · drains last " + doc.drains_last;
}

async function poll() {
  clearTimeout(timer);
  try {
    const response = await fetch("/dashboard/state", { headers: authHeaders(), cache: "no-store" });
    if (response.status === 401) {
      banner("This admin listener needs its bearer token: enter it under “Admin token”.", true);
      document.getElementById("token-box").open = true;
    } else if (!response.ok) {
      banner("The admin listener answered " + response.status + ".", true);
    } else {
      render(await response.json());
      if (document.getElementById("banner").classList.contains("error")) banner("");
    }
  } catch (err) {
    banner("Cannot reach Bascule's admin listener (" + err.message + ").", true);
  }
  timer = setTimeout(poll, POLL_MS);
}

async function act(path, params, what) {
  const query = params ? "?" + new URLSearchParams(params).toString() : "";
  try {
    const response = await fetch(path + query, { method: "POST", headers: authHeaders() });
    const text = await response.text();
    let detail = text;
    try { detail = JSON.stringify(JSON.parse(text)); } catch (_) { /* plain text */ }
    banner(what + ": " + (response.ok ? "done " : "failed (" + response.status + ") ") + detail,
      !response.ok);
  } catch (err) {
    banner(what + " failed: " + err.message, true);
  }
  poll();
}

function start() {
  document.getElementById("upstreams").addEventListener("click", (event) => {
    const button = event.target.closest("button.act");
    if (!button) return;
    const { action, upstream, backend } = button.dataset;
    act("/backends/" + action, { upstream, backend }, action + " " + backend);
  });
  document.getElementById("reload").addEventListener("click", () => act("/reload", null, "Reload"));
  document.getElementById("purge").addEventListener("submit", (event) => {
    event.preventDefault();
    const kind = document.getElementById("purge-kind").value;
    const value = document.getElementById("purge-value").value;
    act("/cache/purge", { [kind]: value }, "Purge " + kind + " " + value);
  });
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = document.getElementById("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("token").value = "";
    document.getElementById("token-box").open = false;
    poll();
  });
  poll();
}

document.addEventListener("DOMContentLoaded", start);
