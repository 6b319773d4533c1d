// The live dashboard: polls /dashboard/data every 2 s and renders one table row per adapter.
// Hand-written, no dependencies, nothing fetched from anywhere but this gateway. Data from
// the gateway only ever reaches the page through textContent, dataset and style widths.
"use strict";

(function () {
  const DATA_URL = "/dashboard/data";
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const KEY_STORAGE = "dora-gateway.dashboard.key";
  const NEUTRAL_PCT = 2;
  const TYPE_LABELS = { base: "base", lora: "LoRA", dora: "DoRA" };
  const MINUS = "\u2212";

  const $ = (id) => document.getElementById(id);
  const els = {
    status: $("status"), statusText: $("status-text"), window: $("window"),
    updated: $("updated"), caption: $("caption"), rows: $("rows"), empty: $("empty"),
    panel: $("panel"), keyForm: $("key-form"), key: $("key"), keyReason: $("key-reason"),
    tenantsPanel: $("tenants-panel"), tenantRows: $("tenant-rows"),
  };
  const LIMITS = ["requests", "tokens", "budget"];
  const PERIOD_WORDS = { day: "today", month: "this month" };

  let timer = null;
  let lastData = null;
  let waitingForKey = false;
  let key = readStoredKey();

  // ---- formatting -------------------------------------------------------------------

  function fixed(value, digits) {
    return value.toLocaleString("en-US", {
      minimumFractionDigits: digits, maximumFractionDigits: digits,
    });
  }

  /** Milliseconds with precision that suits the size: 0.42, 8.31, 45.2, 1,234. */
  function formatMs(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return null;
    if (ms < 10) return fixed(ms, 2);
    if (ms < 100) return fixed(ms, 1);
    return fixed(ms, 0);
  }

  function formatRate(perSecond) {
    if (perSecond === 0) return "0";
    if (perSecond < 0.01) return "<0.01";
    if (perSecond < 10) return fixed(perSecond, 2);
    if (perSecond < 100) return fixed(perSecond, 1);
    return fixed(perSecond, 0);
  }

  /** Signed percent with one decimal ("+1.2%", "−0.4%", "0.0%"); null for no value. */
  function formatPct(pct) {
    if (pct === null || pct === undefined || !isFinite(pct)) return null;
    const text = fixed(Math.abs(pct), 1);
    if (text === "0.0") return "0.0%";
    return (pct > 0 ? "+" : MINUS) + text + "%";
  }

  /** The number a `formatPct` text shows: a figure is coloured by what the reader sees
   * ("−2.0%" is within ±2%, even when the unrounded value is just beyond it). */
  function shownPct(text) {
    return Number(text.replace(MINUS, "-").replace("%", ""));
  }

  function pctLevel(pct) {
    if (pct > NEUTRAL_PCT) return "warn";
    if (pct < -NEUTRAL_PCT) return "good";
    return "neutral";
  }

  function formatWindow(seconds) {
    const plural = (n, unit) => n + " " + unit + (n === 1 ? "" : "s");
    if (seconds >= 3600 && seconds % 3600 === 0) return plural(seconds / 3600, "hour");
    if (seconds >= 60 && seconds % 60 === 0) return plural(seconds / 60, "minute");
    return plural(Math.round(seconds), "second");
  }

  function formatTime(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleTimeString(undefined, {
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
  }

  // ---- rendering --------------------------------------------------------------------

  function cell(col, text, className) {
    const td = document.createElement("td");
    td.dataset.col = col;
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function msCell(col, ms) {
    const text = formatMs(ms);
    if (text === null) {
      const td = cell(col, "\u2014", "num missing");
      td.title = "No streamed request in the window";
      return td;
    }
    return cell(col, text, "num");
  }

  function pillCell(col, text, className) {
    const td = cell(col, "", className);
    const pill = document.createElement("span");
    pill.className = "pill";
    pill.textContent = text;
    td.appendChild(pill);
    return td;
  }

  /** A signed percentage as a coloured pill; "baseline" for the base model, "—" (with
   * `missingTitle` as its tooltip) where there is no figure. */
  function percentCell(col, row, pct, missingTitle) {
    if (isBase(row)) return pillCell(col, "baseline", "num missing");
    const text = formatPct(pct);
    if (text === null) {
      const td = pillCell(col, "\u2014", "num missing");
      td.title = missingTitle;
      return td;
    }
    const level = pctLevel(shownPct(text));
    const td = pillCell(col, text, "num pct " + level);
    td.dataset.level = level;
    return td;
  }

  function overheadCell(col, row) {
    return percentCell(col, row, row[col],
      "Needs streamed requests for both this adapter and the base model");
  }

  /** The engine's measured added cost per token of this model (`engine` from the feed). */
  function engineCell(col, row, engine) {
    const figure = engine && Object.prototype.hasOwnProperty.call(engine, row.adapter)
      ? engine[row.adapter][col] : null;
    return percentCell(col, row, figure,
      "No uniform engine steps of this adapter in the window, or engines that do not measure");
  }

  function typeCell(type) {
    const td = cell("type", "");
    const badge = document.createElement("span");
    const known = Object.prototype.hasOwnProperty.call(TYPE_LABELS, type);
    badge.className = "badge badge-" + (known ? type : "other");
    badge.textContent = known ? TYPE_LABELS[type] : String(type);
    td.appendChild(badge);
    return td;
  }

  /** p50 (solid) and p95 (light) of time to first token, against the slowest p95 shown. */
  function barCell(row, scaleMs) {
    const td = cell("ttft_bar", "", "bar-cell");
    td.setAttribute("aria-hidden", "true");
    if (!scaleMs || row.ttft_p50_ms === null || row.ttft_p95_ms === null) return td;
    const track = document.createElement("div");
    track.className = "bar";
    const p95 = document.createElement("div");
    p95.className = "bar-p95";
    p95.style.width = Math.min(100, (row.ttft_p95_ms / scaleMs) * 100).toFixed(1) + "%";
    const p50 = document.createElement("div");
    p50.className = "bar-p50";
    p50.style.width = Math.min(100, (row.ttft_p50_ms / scaleMs) * 100).toFixed(1) + "%";
    track.append(p95, p50);
    td.appendChild(track);
    return td;
  }

  function errorsCell(row) {
    const td = cell("errors", String(row.errors), "num" + (row.errors > 0 ? " has-errors" : " missing"));
    if (row.errors > 0 && row.requests > 0) {
      td.title = fixed((row.errors / row.requests) * 100, 1) + "% of requests in the window";
    }
    return td;
  }

  function groupStart(td) {
    td.classList.add("group-start");
    return td;
  }

  /** The base model's row, known by its adapter type (its name is a separate thing). */
  function isBase(row) {
    return row.type === "base";
  }

  function sortRows(rows) {
    return rows.slice().sort((a, b) => {
      if (isBase(a) !== isBase(b)) return isBase(a) ? -1 : 1;
      return a.adapter < b.adapter ? -1 : a.adapter > b.adapter ? 1 : 0;
    });
  }

  function render(data) {
    const windowText = formatWindow(data.window_seconds);
    els.window.textContent = windowText;
    els.caption.textContent =
      "Latency per adapter over the last " + windowText + ", all tenants together";
    els.empty.textContent = "No requests in the last " + windowText;
    els.updated.textContent = formatTime(data.generated_at);
    els.updated.dateTime = new Date(data.generated_at * 1000).toISOString();

    const rows = sortRows(Array.isArray(data.adapters) ? data.adapters : []);
    const scaleMs = Math.max(0, ...rows.map((row) => row.ttft_p95_ms || 0));
    const trs = rows.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.adapter = row.adapter;
      const name = document.createElement("th");
      name.scope = "row";
      name.dataset.col = "adapter";
      name.className = "name";
      name.textContent = row.adapter;
      tr.append(
        name,
        typeCell(row.type),
        cell("requests", String(row.requests), "num"),
        cell("rate_per_s", formatRate(row.rate_per_s), "num"),
        groupStart(msCell("ttft_p50_ms", row.ttft_p50_ms)),
        msCell("ttft_p95_ms", row.ttft_p95_ms),
        barCell(row, scaleMs),
        groupStart(msCell("tpot_p50_ms", row.tpot_p50_ms)),
        msCell("tpot_p95_ms", row.tpot_p95_ms),
        groupStart(overheadCell("ttft_overhead_pct", row)),
        overheadCell("tpot_overhead_pct", row),
        groupStart(engineCell("added_cost_pct", row, data.engine)),
        engineCell("dora_cost_pct", row, data.engine),
        groupStart(errorsCell(row)),
      );
      return tr;
    });
    els.rows.replaceChildren(...trs);
    els.empty.hidden = trs.length > 0;
    els.panel.dataset.rows = String(trs.length);
    renderTenants(data.tenants);
  }

  function count(value) {
    return value.toLocaleString("en-US");
  }

  /** "58 of 60 left" and a bar of what is used; "no limit" where the tenant has none. */
  function limitCell(name, limit) {
    if (!limit) return cell(name, "no limit", "limit missing");
    const td = cell(name, "", "limit");
    const used = limit.limit > 0 ? Math.min(1, Math.max(0, 1 - limit.remaining / limit.limit)) : 0;
    const label = document.createElement("span");
    label.className = "limit-text";
    label.textContent = count(limit.remaining) + " of " + count(limit.limit) + " left" +
      (limit.period ? " " + (PERIOD_WORDS[limit.period] || "") : "");
    const track = document.createElement("div");
    track.className = "meter";
    track.setAttribute("aria-hidden", "true");
    const fill = document.createElement("div");
    fill.className = "meter-fill" + (used >= 0.9 ? " high" : "");
    fill.style.width = (used * 100).toFixed(1) + "%";
    track.appendChild(fill);
    td.append(label, track);
    td.dataset.remaining = String(limit.remaining);
    return td;
  }

  function renderTenants(tenants) {
    if (!Array.isArray(tenants) || tenants.length === 0) {
      els.tenantsPanel.hidden = true;
      return;
    }
    const trs = tenants.map((tenant) => {
      const tr = document.createElement("tr");
      tr.dataset.tenant = tenant.tenant;
      const name = document.createElement("th");
      name.scope = "row";
      name.className = "name";
      name.dataset.col = "tenant";
      name.textContent = tenant.tenant;
      tr.append(name, cell("in_flight", tenant.in_flight + " / " + tenant.max_concurrency, "num"));
      if (tenant.limits === null) {
        const td = cell("limits", "counters unreachable", "limit has-errors");
        td.colSpan = LIMITS.length;
        tr.appendChild(td);
      } else {
        for (const name of LIMITS) tr.appendChild(limitCell(name, tenant.limits[name]));
      }
      return tr;
    });
    els.tenantRows.replaceChildren(...trs);
    els.tenantsPanel.hidden = false;
  }

  // ---- state ------------------------------------------------------------------------

  function setStatus(state, text) {
    els.status.dataset.state = state;
    els.statusText.textContent = text;
    const stale = state === "unreachable" || state === "error";
    els.panel.classList.toggle("stale", stale);
    els.updated.classList.toggle("stale", stale && lastData !== null);
  }

  function readStoredKey() {
    try {
      return sessionStorage.getItem(KEY_STORAGE);
    } catch (e) {
      return null;
    }
  }

  /** Kept in this tab's session storage (and in memory, should storage be off). */
  function saveKey(value) {
    key = value;
    try {
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (e) { /* storage off */ }
  }

  function askForKey(rejected, message) {
    waitingForKey = true;
    if (rejected) saveKey(null);
    els.keyReason.textContent = rejected
      ? "That key was not accepted" + (message ? ": " + message : ".")
      : "This gateway shows its metrics only to holders of a metrics or admin key.";
    els.keyForm.classList.toggle("rejected", rejected);
    els.keyForm.hidden = false;
    if (lastData === null) els.panel.hidden = true;
    setStatus("key", rejected ? "Key not accepted" : "Key needed");
    els.key.focus();
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") return body.error.message;
    } catch (e) { /* not JSON */ }
    return "";
  }

  async function poll() {
    timer = null;
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    const controller = new AbortController();
    const abort = setTimeout(() => controller.abort(), TIMEOUT_MS);
    let response;
    try {
      response = await fetch(DATA_URL, { cache: "no-store", headers, signal: controller.signal });
    } catch (e) {
      clearTimeout(abort);
      setStatus("unreachable", "Gateway unreachable, retrying…");
      schedule();
      return;
    }
    clearTimeout(abort);
    if (response.status === 401) {
      const sentKey = Boolean(key);
      askForKey(sentKey, await errorMessage(response));
      return;
    }
    if (!response.ok) {
      const message = await errorMessage(response);
      setStatus("error", "Gateway answered HTTP " + response.status +
        (message ? " (" + message + ")" : "") + ", retrying…");
      schedule();
      return;
    }
    let data;
    try {
      data = await response.json();
    } catch (e) {
      setStatus("error", "Gateway sent data the dashboard cannot read, retrying…");
      schedule();
      return;
    }
    lastData = data;
    els.keyForm.hidden = true;
    els.panel.hidden = false;
    render(data);
    setStatus("live", "Live");
    schedule();
  }

  function schedule() {
    if (timer === null && !waitingForKey) timer = setTimeout(poll, POLL_MS);
  }

  els.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = els.key.value.trim();
    if (!value) return;
    saveKey(value);
    els.key.value = "";
    els.keyForm.hidden = true;
    waitingForKey = false;
    setStatus("loading", "Checking key…");
    if (timer !== null) clearTimeout(timer);
    poll();
  });

  poll();
})();
