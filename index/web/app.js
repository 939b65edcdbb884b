// clipforge search page: plain JavaScript against the service's JSON API (POST /search,
// GET /items/{id}/image, GET /health). No build step: this file is served as-is.
//
// A service started with an API key answers 401 without "Authorization: Bearer KEY". The page
// then asks for the key once, keeps it in sessionStorage (this tab only, gone when it closes)
// and sends it on every request. An <img src> cannot carry that header, so with a key the
// result images are fetched with it and shown from blob: URLs.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORAGE = "clipforge-api-key";
// again: repeats the current query (with the new k / target when those change)
const state = { maxK: 1000, busy: 0, again: null, key: sessionStorage.getItem(KEY_STORAGE) };

class NeedsKey extends Error {}

function withKey(headers = {}) {
  return state.key ? { ...headers, Authorization: `Bearer ${state.key}` } : headers;
}

// fetch() with the key; a 401 opens the key form and throws NeedsKey
async function api(url, options = {}) {
  const response = await fetch(url, { ...options, headers: withKey(options.headers) });
  if (response.status === 401) {
    askForKey(state.key ? "That key was refused: enter the right one." : "");
    throw new NeedsKey("this service needs an API key");
  }
  return response;
}

function askForKey(note) {
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $("#key-note").textContent = note;
  $("#key-form").hidden = false;
  $("#api-key").focus();
}

function useKey(key) {
  key = key.trim();
  if (!key) return;
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("#api-key").value = "";
  $("#key-form").hidden = true;
  rerun(); // the search that was refused
}

// Show `url` in `img`: directly, or (with a key) fetched with it and shown as a blob: URL that
// is released once the image has decoded.
function setImage(img, url) {
  if (!state.key || url.startsWith("blob:")) {
    img.src = url;
    return;
  }
  fetch(url, { headers: withKey() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`HTTP ${r.status}`))))
    .then((blob) => {
      const local = URL.createObjectURL(blob);
      const release = () => URL.revokeObjectURL(local);
      img.addEventListener("load", release, { once: true });
      img.addEventListener("error", release, { once: true });
      img.src = local;
    })
    .catch(() => img.dispatchEvent(new Event("error")));
}

function target() {
  return document.querySelector('input[name="target"]:checked').value;
}

function k() {
  return Math.min(Number($("#k").value), state.maxK);
}

async function loadInfo() {
  try {
    const r = await fetch("/health"); // public: no key needed
    const h = await r.json();
    state.maxK = h.limits.max_k;
    const hash = h.model_hash ? ` · model ${h.model_hash.slice(0, 8)}` : "";
    $("#info").textContent = `${h.index} · ${h.count.toLocaleString()} items${hash}`;
    if (!h.targets.includes("text")) {
      document.querySelector('input[name="target"][value="text"]').disabled = true;
    }
  } catch (e) {
    $("#info").textContent = "service unreachable";
  }
}

// ---------------------------------------------------------------- searching

async function search(body, describe) {
  const ticket = ++state.busy; // a newer search supersedes an older one still in flight
  document.body.classList.add("loading");
  showStatus(describe, "searching…");
  let response, payload;
  try {
    response = await api("/search", body instanceof FormData
      ? { method: "POST", body }
      : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    payload = await response.json();
  } catch (e) {
    if (ticket !== state.busy) return;
    if (e instanceof NeedsKey) showError("This service needs an API key: enter it above.");
    else showError(`The service did not answer (${e.message}).`);
    return;
  } finally {
    if (ticket === state.busy) document.body.classList.remove("loading");
  }
  if (ticket !== state.busy) return;
  if (!response.ok) {
    showError(payload.detail || `HTTP ${response.status}`);
    return;
  }
  showStatus(describe, `${payload.hits.length} results · ${payload.took_ms.toFixed(0)} ms`);
  render(payload.hits);
  $("#results").dataset.target = payload.target; // which index answered (image or text)
}

function searchText(text) {
  text = text.trim();
  if (!text) return;
  state.again = () => searchText(text);
  const url = new URL(location.href);
  url.searchParams.set("q", text);
  url.searchParams.delete("item");
  history.replaceState(null, "", url);
  search({ text, k: k(), target: target() }, describeText(text));
}

function searchItem(hit) {
  state.again = () => searchItem(hit);
  const url = new URL(location.href);
  url.searchParams.set("item", hit.id);
  url.searchParams.delete("q");
  history.replaceState(null, "", url);
  $("#query").value = "";
  search({ item: hit.id, k: k(), target: target() }, describeImage(hit.image_url, `similar to “${hit.caption}”`));
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function searchUpload(file) {
  if (!file) return;
  state.again = () => searchUpload(file);
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(k()));
  form.append("target", target());
  $("#query").value = "";
  search(form, describeImage(URL.createObjectURL(file), `similar to ${file.name}`));
}

// ---------------------------------------------------------------- rendering

function describeText(text) {
  const span = document.createElement("span");
  span.className = "chip";
  span.textContent = `“${text}”`;
  return span;
}

function describeImage(src, label) {
  const span = document.createElement("span");
  span.className = "chip";
  const img = document.createElement("img");
  img.dataset.src = src; // set on each copy showStatus makes (a blob: URL is per element)
  img.alt = "";
  span.append(img, document.createTextNode(label));
  return span;
}

function showStatus(describe, note) {
  const status = $("#status");
  status.className = "status";
  const shown = describe.cloneNode(true);
  for (const img of shown.querySelectorAll("img[data-src]")) setImage(img, img.dataset.src);
  status.replaceChildren(shown);
  const small = document.createElement("span");
  small.className = "muted";
  small.textContent = note;
  status.append(small);
  $("#hint").hidden = true;
}

function showError(message) {
  const status = $("#status");
  status.className = "status error";
  status.textContent = message;
  $("#results").replaceChildren();
}

function render(hits) {
  const grid = $("#results");
  grid.replaceChildren();
  const best = hits.length ? hits[0].score : 1;
  hits.forEach((hit, rank) => {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.title = `${hit.caption}\nkey ${hit.key} · id ${hit.id}\nClick to find similar images`;
    card.tabIndex = 0;

    const frame = document.createElement("div");
    frame.className = "frame";
    const img = document.createElement("img");
    img.loading = rank < 24 ? "eager" : "lazy";
    img.decoding = "async";
    img.alt = hit.caption;
    img.onerror = () => frame.classList.add("broken");
    setImage(img, hit.image_url);
    frame.append(img);

    const caption = document.createElement("figcaption");
    const text = document.createElement("div");
    text.className = "caption";
    text.textContent = hit.caption || hit.key;
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const meter = document.createElement("span");
    meter.className = "meter";
    // relative to the best hit: how far down the list the similarity falls off
    meter.style.setProperty("--w", `${Math.max(4, Math.round((100 * hit.score) / (best || 1)))}%`);
    const place = document.createElement("span");
    place.className = "rank muted";
    place.textContent = `#${rank + 1}`;
    meta.append(score, meter, place);
    caption.append(text, meta);

    card.append(frame, caption);
    card.addEventListener("click", () => searchItem(hit));
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") searchItem(hit); });
    grid.append(card);
  });
}

// ---------------------------------------------------------------- wiring

function rerun() {
  if (state.again) {
    state.again();
    return;
  }
  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    $("#query").value = params.get("q");
    searchText(params.get("q"));
  } else if (params.get("item")) {
    const id = Number(params.get("item"));
    searchItem({ id, image_url: `/items/${id}/image`, caption: `item ${id}` });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey($("#api-key").value);
  });
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    searchText($("#query").value);
  });
  $("#image-input").addEventListener("change", (e) => searchUpload(e.target.files[0]));
  for (const el of document.querySelectorAll('input[name="target"], #k')) {
    el.addEventListener("change", rerun);
  }
  const zone = document.body;
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    searchUpload(e.dataTransfer.files[0]);
  });
  rerun();
});
