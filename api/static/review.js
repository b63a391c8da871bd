// The QA review page: pages through GET /v1/review and posts decisions to
// POST /v1/images/{id}/review. The API key is asked for once and kept in sessionStorage
// (this tab only); every call sends it as a Bearer token. No build step, no dependencies.
"use strict";

const KEY_STORAGE = "instabatch.apiKey";
const PAGE_SIZE = 25;
const PREFETCH_WHEN_LEFT = 8;      // fetch the next page when this few undecided cards remain below the focus
const KEEP_DECIDED = 60;           // decided cards kept above the focus; older ones leave the DOM
const SMALL_IMAGE = 256;           // images narrower than this are upscaled with visible pixels
const APPROVE_CODES = ["acceptable", "false_positive", "minor_issue"];
const REJECT_CODES = ["wrong_object", "wrong_color", "wrong_backdrop", "artifact", "blurry", "off_brand",
  "near_duplicate", "unsafe", "other"];
const DECISIONS = {
  approve: { label: "Approve", key: "a", status: "approved" },
  reject: { label: "Reject", key: "r", status: "rejected" },
  regenerate: { label: "Regenerate", key: "g", status: "regenerated" },
};

const state = {
  cards: [],            // {entry, el, decided}
  focus: -1,
  cursor: null,
  done: false,          // the last page has been fetched
  loading: null,        // the pending page request
  remaining: null,
  filters: {},
};

const $ = (id) => document.getElementById(id);

// -- the key -----------------------------------------------------------------------------

function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }

function askForKey(message) {
  $("key-error").hidden = !message;
  $("key-error").textContent = message || "";
  $("key-dialog").hidden = false;
  $("sign-out").hidden = true;
  $("key-input").value = "";
  $("key-input").focus();
}

class AuthError extends Error {}

async function api(path, options = {}) {
  const key = apiKey();
  if (!key) throw new AuthError("no key");
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json", ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { /* an empty or non-JSON body */ }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORAGE);
    throw new AuthError(body?.error?.message || "the key was refused");
  }
  if (!response.ok) {
    const error = new Error(body?.error?.message || `HTTP ${response.status}`);
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

// -- loading pages -----------------------------------------------------------------------

function queueUrl() {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  if (state.cursor) params.set("cursor", state.cursor);
  return `/v1/review?${params}`;
}

function loadMore() {
  if (state.done || state.loading) return state.loading;
  $("loading").hidden = false;
  $("load-more").hidden = true;
  state.loading = api(queueUrl())
    .then((page) => {
      if (page.total !== null && page.total !== undefined) setRemaining(page.total);
      const known = new Set(state.cards.map((card) => card.entry.image_id));
      for (const entry of page.entries) if (!known.has(entry.image_id)) addCard(entry);
      state.cursor = page.next_cursor;
      state.done = !page.next_cursor;
      if (state.focus < 0 && state.cards.length) moveFocus(0);
      refreshEmpty();
    })
    .catch(handleError)
    .finally(() => {
      state.loading = null;
      $("loading").hidden = true;
      $("load-more").hidden = state.done;
    });
  return state.loading;
}

function maybeLoadMore() {
  const left = state.cards.slice(state.focus + 1).filter((card) => !card.decided).length;
  if (left < PREFETCH_WHEN_LEFT) loadMore();
}

// -- the queue count, pushed ------------------------------------------------------------
// With a batch filter (and no reason filter) the count follows the batch's server-sent events
// (GET /v1/batches/{id}/events): read with fetch, as EventSource cannot send the API key.

let countStream = null;

async function followCount() {
  if (countStream) countStream.abort();
  countStream = null;
  const batchId = state.filters.batch_id;
  if (!batchId || state.filters.reason || !apiKey()) return;
  const controller = new AbortController();
  countStream = controller;
  try {
    const response = await fetch(`/v1/batches/${encodeURIComponent(batchId)}/events?until_complete=false&interval=2`, {
      headers: { Authorization: `Bearer ${apiKey()}`, Accept: "text/event-stream" }, signal: controller.signal,
    });
    if (!response.ok || !response.body) return;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim());
        if (data.length) setRemaining(JSON.parse(data.join("\n")).awaiting_review);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") console.warn("queue count stream ended:", error.message);
  }
}

function restart() {
  followCount();
  $("queue").replaceChildren();
  Object.assign(state, { cards: [], focus: -1, cursor: null, done: false, remaining: null });
  setRemaining(null);
  return loadMore();
}

function setRemaining(count) {
  state.remaining = count;
  $("remaining").textContent = count === null ? "–" : `${count.toLocaleString()} awaiting review`;
}

function refreshEmpty() {
  $("empty").hidden = !(state.done && !state.cards.some((card) => !card.decided));
}

// -- cards -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function picture(src, alt, className) {
  const img = el("img", { src, alt, class: className, loading: "lazy", decoding: "async" });
  img.addEventListener("load", () => img.classList.toggle("small", img.naturalWidth < SMALL_IMAGE));
  return img;
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toPrecision(3);
  if (value && typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function describeAttributes(attributes) {
  // The attribute judge: what the prompt asked for against what the image shows.
  return Object.entries(attributes || {}).map(([name, graded]) =>
    `${name}: wanted ${graded.wanted} (p ${formatValue(graded.p_wanted)}), seen ${graded.seen}`);
}

function metricsTable(entry) {
  const rows = [];
  const flagged = new Set();
  for (const finding of entry.findings) {
    const limits = Object.entries(finding.thresholds || {}).map(([k, v]) => `${k} ${formatValue(v)}`).join(", ");
    const values = Object.entries(finding.metrics || {})
      .filter(([, v]) => typeof v !== "object" || v === null)
      .map(([k, v]) => `${k} ${formatValue(v)}`)
      .concat(describeAttributes(finding.metrics?.attributes)).join(", ");
    rows.push(el("tr", { class: "flagged" },
      el("td", { text: `${finding.scorer}: ${finding.reasons.join(", ")}` }),
      el("td", { text: values }),
      el("td", { text: limits ? `limits: ${limits}` : "" })));
    flagged.add(finding.scorer);
  }
  for (const [name, value] of Object.entries(entry.metrics)) {
    if (flagged.has(name.split(".")[0])) continue;
    rows.push(el("tr", {}, el("th", { text: name }), el("td", { text: formatValue(value) }), el("td")));
  }
  return el("table", { class: "metrics" }, el("tbody", {}, ...rows));
}

// Content Credentials (docs/compliance.md): signed or not, by which chain, watermark or why none.
function credentialChip(credentials) {
  if (!credentials) return el("span", { class: "chip credentials missing", text: "no content credentials" });
  const signed = credentials.signed
    ? `C2PA signed${credentials.development_chain ? " (untrusted dev chain)" : ""}` : "not signed";
  const mark = credentials.watermark === "embedded"
    ? `watermark ${credentials.watermark_id}` : `no watermark: ${credentials.watermark_skipped || "skipped"}`;
  return el("span", { class: "chip credentials", title: credentials.signer || "", text: `${signed} · ${mark}` });
}

function reasonSelect(entry) {
  const select = el("select", { class: "reason", "aria-label": "Reason" });
  const flaggedCodes = [...new Set(entry.reasons)];
  const rejectCodes = [...flaggedCodes, ...REJECT_CODES.filter((code) => !flaggedCodes.includes(code))];
  select.append(
    el("optgroup", { label: "Reject / regenerate because" }, ...rejectCodes.map((code) => el("option", { value: code, text: code }))),
    el("optgroup", { label: "Approve because" }, ...APPROVE_CODES.map((code) => el("option", { value: code, text: code }))),
  );
  select.value = rejectCodes[0];
  return select;
}

function addCard(entry) {
  const card = { entry, decided: false };
  const index = state.cards.length;
  const select = reasonSelect(entry);
  const comment = el("input", { class: "comment", placeholder: "comment (optional)", maxlength: "2000" });
  const buttons = Object.entries(DECISIONS).map(([decision, spec]) => el("button",
    { type: "button", class: decision, "data-decision": decision, onclick: () => decide(card, decision) },
    spec.label, el("kbd", { text: spec.key })));
  const related = [];
  if (entry.parent_url) related.push(el("figure", {}, picture(entry.parent_url, "the image this one regenerates"), el("figcaption", { text: "regenerated from" })));
  if (entry.twin_url) related.push(el("figure", {}, picture(entry.twin_url, "the earlier near-duplicate"), el("figcaption", { text: "looks like" })));
  const created = new Date(entry.created_at).toLocaleString();
  card.el = el("article", { class: "card", "data-image-id": entry.image_id, tabindex: "-1",
      onclick: (event) => { if (!event.target.closest("button, select, input")) moveFocus(state.cards.indexOf(card)); } },
    el("div", { class: "media" },
      entry.url ? picture(entry.url, entry.prompt, "thumb") : el("div", { class: "thumb", text: "image unavailable" }),
      related.length ? el("div", { class: "related" }, ...related) : null),
    el("div", { class: "details" },
      el("p", { class: "prompt", text: entry.prompt }),
      el("div", { class: "meta" },
        `${entry.batch_name} · ${entry.team} · item ${entry.external_id ?? entry.item_id.slice(0, 8)} · seed ${entry.seed} · `
        + `${entry.width}×${entry.height} · ${created} · `, el("code", { text: entry.image_id })),
      el("div", { class: "chips" },
        el("span", { class: `verdict ${entry.verdict}`, text: entry.verdict.toUpperCase() }),
        ...entry.reasons.map((reason) => el("span", { class: "chip", text: reason })),
        credentialChip(entry.credentials)),
      metricsTable(entry),
      el("div", { class: "actions" }, select, comment, ...buttons),
      el("div", { class: "outcome", "aria-live": "polite" })));
  Object.assign(card, { select, comment, buttons, outcome: card.el.querySelector(".outcome") });
  $("queue").append(card.el);
  state.cards.push(card);
  return index;
}

function moveFocus(index) {
  if (index < 0 || index >= state.cards.length) return;
  state.cards[state.focus]?.el.classList.remove("focused");
  state.focus = index;
  const card = state.cards[index];
  card.el.classList.add("focused");
  card.el.scrollIntoView({ block: "center" });  // instant: j/j/j must not lag behind the keys
  maybeLoadMore();
}

function nextUndecided(from) {
  for (let i = from + 1; i < state.cards.length; i++) if (!state.cards[i].decided) return i;
  return -1;
}

function reasonFor(card, decision) {
  const chosen = card.select.value;
  const approving = APPROVE_CODES.includes(chosen);
  if (decision === "approve") return approving ? chosen : "acceptable";
  return approving ? (card.entry.reasons[0] || "other") : chosen;
}

async function decide(card, decision) {
  if (card.decided || card.pending) return;
  card.pending = true;
  card.buttons.forEach((button) => { button.disabled = true; });
  const reason = reasonFor(card, decision);
  const body = { decision, reason_code: reason };
  if (card.comment.value.trim()) body.comment = card.comment.value.trim();
  try {
    const result = await api(`/v1/images/${encodeURIComponent(card.entry.image_id)}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const extra = result.regeneration ? ` · new seed ${result.regeneration.seed}, the new image will come through QC` : "";
    markDecided(card, result.review_status, `${result.review_status} · ${reason}${extra}`);
  } catch (error) {
    if (error.status === 409) {
      markDecided(card, error.body?.error?.details?.review_status || "decided", "already decided by someone else");
    } else {
      card.buttons.forEach((button) => { button.disabled = false; });
      card.outcome.classList.add("error");
      card.outcome.textContent = error.message;
      handleError(error);
    }
  } finally {
    card.pending = false;
  }
}

function markDecided(card, status, text) {
  card.decided = true;
  card.el.classList.add("decided", `decided-${status}`);
  card.el.dataset.status = status;
  card.outcome.classList.remove("error");
  card.outcome.textContent = text;
  card.buttons.forEach((button) => { button.disabled = true; });
  if (state.remaining !== null) setRemaining(Math.max(0, state.remaining - 1));
  if (state.cards[state.focus] === card) {
    const next = nextUndecided(state.focus);
    if (next >= 0) moveFocus(next);
    else maybeLoadMore();
  }
  trimDecided();
  refreshEmpty();
}

function trimDecided() {
  // Thousands of flagged images: keep the DOM small by dropping old decided cards above the focus.
  const above = state.cards.slice(0, Math.max(state.focus, 0)).filter((card) => card.decided);
  const excess = above.length - KEEP_DECIDED;
  if (excess <= 0) return;
  const drop = new Set(above.slice(0, excess));
  drop.forEach((card) => card.el.remove());
  const focused = state.cards[state.focus];
  state.cards = state.cards.filter((card) => !drop.has(card));
  state.focus = state.cards.indexOf(focused);
}

// -- errors ------------------------------------------------------------------------------

let toastTimer = null;
function toast(message, isError = false) {
  const node = $("toast");
  node.textContent = message;
  node.classList.toggle("error", isError);
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { node.hidden = true; }, 5000);
}

function handleError(error) {
  if (error instanceof AuthError) askForKey(error.message === "no key" ? "" : error.message);
  else if (error.status === 403) toast(`${error.message} — this key may read the queue but not decide`, true);
  else toast(error.message, true);
}

// -- keyboard ----------------------------------------------------------------------------

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Escape") {
    $("help").hidden = true;
    if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
    return;
  }
  const typing = event.target.closest?.("input, select, textarea");
  if (typing || !$("key-dialog").hidden) return;
  const card = state.cards[state.focus];
  const actions = {
    j: () => moveFocus(Math.min(state.focus + 1, state.cards.length - 1)),
    k: () => moveFocus(Math.max(state.focus - 1, 0)),
    a: () => card && decide(card, "approve"),
    r: () => card && decide(card, "reject"),
    g: () => card && decide(card, "regenerate"),
    c: () => card && card.comment.focus(),
    "?": () => { $("help").hidden = !$("help").hidden; },
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
}

// -- start -------------------------------------------------------------------------------

function start() {
  $("reason-list").append(...[...REJECT_CODES, "underexposed", "overexposed", "low_contrast", "misaligned"]
    .map((code) => el("option", { value: code })));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-dialog").hidden = true;
    $("sign-out").hidden = false;
    restart();
  });
  $("sign-out").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORAGE); restart(); });
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = { batch_id: $("filter-batch").value.trim(), reason: $("filter-reason").value.trim() };
    restart();
  });
  $("load-more").addEventListener("click", () => loadMore());
  $("help-button").addEventListener("click", () => { $("help").hidden = false; });
  $("help-close").addEventListener("click", () => { $("help").hidden = true; });
  document.addEventListener("keydown", onKey);
  new IntersectionObserver((seen) => { if (seen.some((e) => e.isIntersecting) && state.cards.length) loadMore(); })
    .observe($("sentinel"));
  if (apiKey()) {
    $("sign-out").hidden = false;
    restart();
  } else {
    askForKey("");
  }
}

document.addEventListener("DOMContentLoaded", start);
