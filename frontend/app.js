// Loupe's gallery: browse, search by words or pictures, refine with a query mixer, filter, inspect, upload.
// Plain ES module, no build step, no network access beyond this server.
import { sha256hex } from "/sha256.js";

const $ = (id) => document.getElementById(id);
const grid = $("grid"), statusEl = $("status");
const state = {
  terms: [],        // {text, channel} | {image_id} | {vector, label}, each with a weight
  filters: null,    // the filter grammar object, or null
  cursor: null,
  loading: false,
  cutoff: 0,
};

// ---------------------------------------------------------------- API

async function api(path, options = {}) {
  const res = await fetch(path, options);
  if (res.status === 401 && path !== "/api/session") showSignIn();
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`);
  return body;
}
const json = (body) => ({ method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

// ---------------------------------------------------------------- sign-in (when the server requires keys)

function showSignIn() {
  const dlg = $("signin");
  if (!dlg.open) dlg.showModal();
  $("signin-key").focus();
}
$("signin-form").onsubmit = async (ev) => {
  ev.preventDefault();
  const res = await fetch("/api/session", json({ key: $("signin-key").value.trim() }));
  if (res.ok) { $("signin").close(); location.reload(); }
  else $("signin-error").textContent = "That key is not valid.";
};

// ---------------------------------------------------------------- results

function card(item) {
  const fig = document.createElement("figure");
  fig.tabIndex = 0;
  fig.dataset.id = item.id;
  if (item.score !== undefined) fig.dataset.score = item.score;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.original_name || `picture ${item.id}`;
  img.src = item.thumbnail_url;
  const aspect = Math.min(3, Math.max(0.4, (item.width || 1) / (item.height || 1)));
  fig.style.flex = `${aspect * 180} 1 ${aspect * 180}px`;
  img.width = Math.round(aspect * 180); img.height = 180;
  img.onerror = () => img.removeAttribute("src");
  const cap = document.createElement("figcaption");
  const label = document.createElement("span");
  label.className = "score";
  label.textContent = item.score !== undefined ? item.score.toFixed(3) : (item.state === "ready" ? "" : item.state);
  if (item.channels) label.title = Object.entries(item.channels).map(([c, s]) => `${c} ${s.toFixed(3)}`).join(", ");
  cap.append(label);
  for (const [text, weight, title] of [["+", 1, "More like this"], ["−", -0.5, "Less like this"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.title = title;
    b.setAttribute("aria-label", `${title}: picture ${item.id}`);
    b.onclick = (ev) => { ev.stopPropagation(); addTerm({ image_id: item.id, weight }); };
    cap.append(b);
  }
  if (item.text?.snippet) {
    const snip = document.createElement("p");
    snip.className = "snippet";
    snip.innerHTML = item.text.snippet;  // server-escaped HTML with <mark>
    cap.append(snip);
  }
  fig.append(img, cap);
  fig.onclick = () => openDetail(item.id, item.text);
  fig.onkeydown = (ev) => { if (ev.key === "Enter") openDetail(item.id, item.text); };
  applyCutoff(fig);
  return fig;
}

function applyCutoff(fig) {
  const s = fig.dataset.score;
  fig.hidden = s !== undefined && Number(s) < state.cutoff;
}

function searchBody(reset) {
  const query = state.terms.map(({ label, ...t }) => t);
  return { query, filters: state.filters, limit: 60, cursor: reset ? null : state.cursor };
}

async function page(reset) {
  if (state.loading) return;
  state.loading = true;
  grid.setAttribute("aria-busy", "true");
  try {
    let items, next, note;
    if (state.terms.length) {
      const body = await api("/api/search", json(searchBody(reset)));
      items = body.hits; next = body.next_cursor;
      note = items.length ? `Results in ${body.timing_ms.total.toFixed(0)} ms` : "Nothing matches.";
    } else {
      const q = new URLSearchParams({ limit: "60" });
      if (!reset && state.cursor) q.set("cursor", state.cursor);
      if (state.filters) q.set("filters", JSON.stringify(state.filters));
      const body = await api("/api/images?" + q);
      items = body.images; next = body.next_cursor;
      note = items.length ? (body.total != null ? `${body.total} picture${body.total === 1 ? "" : "s"}` : "Newest first") : "No pictures yet: upload some.";
    }
    if (reset) { grid.replaceChildren(); statusEl.textContent = note; }
    grid.append(...items.map(card));
    state.cursor = next;
  } catch (e) {
    statusEl.textContent = e.message;
  } finally {
    state.loading = false;
    grid.setAttribute("aria-busy", "false");
  }
}

// ---------------------------------------------------------------- the query mixer and the URL

function termLabel(t) {
  if (t.text) return t.channel && t.channel !== "clip" ? `${t.text} (${t.channel})` : t.text;
  if (t.image_id) return `picture ${t.image_id}`;
  return t.label || "uploaded picture";
}

function renderMixer() {
  const box = $("mixer");
  box.replaceChildren(...state.terms.map((t, i) => {
    const chip = document.createElement("span");
    chip.className = "term" + (t.weight < 0 ? " neg" : "");
    const name = document.createElement("span");
    name.textContent = termLabel(t);
    const w = document.createElement("input");
    w.type = "number"; w.step = "0.1"; w.min = "-5"; w.max = "5"; w.value = t.weight;
    w.setAttribute("aria-label", `Weight of ${termLabel(t)}`);
    w.onchange = () => { t.weight = Number(w.value) || 0; run(); };
    const rm = document.createElement("button");
    rm.type = "button"; rm.textContent = "×";
    rm.setAttribute("aria-label", `Remove ${termLabel(t)}`);
    rm.onclick = () => { state.terms.splice(i, 1); run(); };
    chip.append(name, w, rm);
    return chip;
  }));
}

function toUrl() {
  const p = new URLSearchParams();
  const portable = state.terms.filter((t) => !t.vector);
  if (portable.length) p.set("query", JSON.stringify(portable));
  if (state.filters) p.set("filters", JSON.stringify(state.filters));
  const url = p.toString() ? "?" + p : "/";
  if (url !== location.search || (url === "/" && location.search)) history.pushState(null, "", url);
}

function fromUrl() {
  const p = new URLSearchParams(location.search);
  try {
    state.terms = p.get("query") ? JSON.parse(p.get("query")) : (p.get("q") ? [{ text: p.get("q"), weight: 1 }] : []);
    state.filters = p.get("filters") ? JSON.parse(p.get("filters")) : null;
  } catch { state.terms = []; state.filters = null; }
  const firstText = state.terms.find((t) => t.text);
  $("q").value = firstText?.text || "";
  if (firstText?.channel) $("channel").value = firstText.channel;
  fillFilterForm();
  renderMixer();
  page(true);
}

function run() { renderMixer(); toUrl(); page(true); }
function addTerm(t) { state.terms.push(t); run(); }

$("search").onsubmit = (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  state.terms = state.terms.filter((t) => !t.text);
  if (q) state.terms.unshift({ text: q, weight: 1, channel: $("channel").value });
  run();
};

// ---------------------------------------------------------------- filters

const filterForm = $("filters");
$("toggle-filters").onclick = () => {
  filterForm.hidden = !filterForm.hidden;
  $("toggle-filters").setAttribute("aria-expanded", String(!filterForm.hidden));
};
const list = (s) => s.split(",").map((x) => x.trim()).filter(Boolean);

function readFilterForm() {
  const f = new FormData(filterForm), out = {};
  if (list(f.get("tags") || "").length) out.tags = { any: list(f.get("tags")) };
  if (list(f.get("albums") || "").length) out.albums = { any: list(f.get("albums")) };
  if (f.get("from") || f.get("to")) out.taken = { ...(f.get("from") && { from: f.get("from") }), ...(f.get("to") && { to: f.get("to") }) };
  if (f.get("camera")) out.camera = { model: f.get("camera") };
  if (f.get("min_width")) out.width = { min: Number(f.get("min_width")) };
  const aspect = { landscape: { min: 1.05 }, portrait: { max: 0.95 }, square: { min: 0.95, max: 1.05 } }[f.get("aspect")];
  if (aspect) out.aspect = aspect;
  if (f.get("has_text")) out.has_text = true;
  if (f.get("starred")) out.starred = true;
  return Object.keys(out).length ? out : null;
}

function fillFilterForm() {
  const f = state.filters || {}, el = filterForm.elements;
  el.tags.value = f.tags?.any?.join(", ") || "";
  el.albums.value = f.albums?.any?.join(", ") || "";
  el.from.value = f.taken?.from || ""; el.to.value = f.taken?.to || "";
  el.camera.value = f.camera?.model || "";
  el.min_width.value = f.width?.min ?? "";
  const a = f.aspect;
  el.aspect.value = !a ? "" : a.min >= 1.05 ? "landscape" : a.max <= 0.95 ? "portrait" : "square";
  el.has_text.checked = !!f.has_text; el.starred.checked = !!f.starred;
}
filterForm.onsubmit = (ev) => { ev.preventDefault(); state.filters = readFilterForm(); run(); };
filterForm.onreset = () => setTimeout(() => { state.filters = null; run(); });

// ---------------------------------------------------------------- search by a picture

async function searchByImage(file) {
  const fd = new FormData();
  fd.append("image", file);
  fd.append("query", JSON.stringify({ limit: 60 }));
  try {
    statusEl.textContent = `Searching by ${file.name || "the picture"}…`;
    const body = await api("/api/search/image", { method: "POST", body: fd });
    // The composed query comes back as one vector term: later pages and refinements need no re-upload.
    state.terms = [{ ...body.query_term, label: file.name || "pasted picture" }];
    renderMixer();
    toUrl();
    grid.replaceChildren(...body.hits.map(card));
    state.cursor = body.next_cursor;
    statusEl.textContent = `Similar to ${file.name || "the pasted picture"}`;
  } catch (e) { statusEl.textContent = e.message; }
}
$("byimage").onchange = (ev) => { if (ev.target.files[0]) searchByImage(ev.target.files[0]); ev.target.value = ""; };
document.addEventListener("paste", (ev) => {
  const file = [...(ev.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
  if (file) { ev.preventDefault(); searchByImage(file); }
});

// ---------------------------------------------------------------- drag and drop

const dropzone = $("dropzone");
let dragDepth = 0;
document.addEventListener("dragenter", (ev) => { if (ev.dataTransfer?.types.includes("Files")) { dragDepth++; dropzone.hidden = false; } });
document.addEventListener("dragleave", () => { if (--dragDepth <= 0) { dragDepth = 0; dropzone.hidden = true; } });
document.addEventListener("dragover", (ev) => ev.preventDefault());
document.addEventListener("drop", async (ev) => {
  ev.preventDefault();
  dragDepth = 0; dropzone.hidden = true;
  const files = await droppedFiles(ev.dataTransfer);
  const onSearch = ev.target.closest?.("#search");
  if (onSearch && files.length === 1) searchByImage(files[0]);
  else if (files.length) uploadFiles(files);
});

async function droppedFiles(dt) {
  // Folders too: walk the entries where the browser offers them.
  const entries = [...(dt.items || [])].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dt.files];
  const out = [];
  async function walk(entry) {
    if (entry.isFile) out.push(await new Promise((res, rej) => entry.file(res, rej)));
    else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  }
  for (const e of entries) await walk(e);
  return out;
}

// ---------------------------------------------------------------- upload

$("upload").onchange = (ev) => { uploadFiles([...ev.target.files]); ev.target.value = ""; };
$("upload-folder").onchange = (ev) => { uploadFiles([...ev.target.files]); ev.target.value = ""; };

function uploadRow(file) {
  const li = document.createElement("li");
  const name = document.createElement("span");
  name.textContent = file.webkitRelativePath || file.name;
  const st = document.createElement("span");
  st.className = "state";
  st.textContent = "queued";
  li.append(name, st);
  $("upload-list").append(li);
  return st;
}

async function uploadFiles(files) {
  files = files.filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|webp|gif|bmp|tiff?)$/i.test(f.name));
  if (!files.length) return;
  $("uploads").hidden = false;
  const rows = files.map(uploadRow);
  const bar = $("upload-progress");
  bar.max = files.length; bar.value = 0;
  const counts = { accepted: 0, duplicate: 0, rejected: 0, skipped: 0 };
  const summary = () => { $("upload-summary").textContent = Object.entries(counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", "); };
  // Skip what is stored already: hash here (crypto.subtle, or a JS fallback on plain-HTTP LAN addresses).
  const hashes = [];
  for (const [i, f] of files.entries()) { rows[i].textContent = "checking"; hashes.push(await sha256hex(await f.arrayBuffer())); }
  const { existing } = await api("/api/images/exists", json({ sha256: hashes }));
  const todo = [];
  files.forEach((f, i) => {
    if (existing[hashes[i]]) { rows[i].textContent = "already stored"; counts.skipped++; bar.value++; } else todo.push(i);
  });
  summary();
  for (let start = 0; start < todo.length; start += 20) {
    const chunk = todo.slice(start, start + 20);
    const fd = new FormData();
    chunk.forEach((i) => { fd.append("file", files[i], files[i].name); rows[i].textContent = "uploading"; });
    const body = await send(fd, (p) => chunk.forEach((i) => { rows[i].textContent = `uploading ${Math.round(p * 100)}%`; }));
    const outcomes = body?.files || body?.error?.detail?.files || [];
    chunk.forEach((i, k) => {
      const o = outcomes[k];
      if (!o) { rows[i].textContent = body?.error?.message || "failed"; counts.rejected++; return; }
      counts[o.status]++;
      rows[i].textContent = o.status === "rejected" ? `rejected: ${o.error.message}` : o.status;
      rows[i].className = "state " + o.status;
    });
    bar.value += chunk.length;
    summary();
  }
  statusEl.textContent = "Upload finished; new pictures appear once processed.";
  setTimeout(() => { if (!state.terms.length) page(true); }, 1500);
}

function send(fd, onProgress) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/images");
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => { try { resolve(JSON.parse(xhr.responseText)); } catch { resolve(null); } };
    xhr.onerror = () => resolve(null);
    xhr.send(fd);
  });
}

// ---------------------------------------------------------------- detail view

const dialog = $("detail");
let current = null;

function fact(dl, k, v) {
  if (v === null || v === undefined || v === "") return;
  const dt = document.createElement("dt"); dt.textContent = k;
  const dd = document.createElement("dd"); dd.textContent = v;
  dl.append(dt, dd);
}

function strip(el, items) {
  el.replaceChildren(...items.map((h) => {
    const b = document.createElement("button");
    b.type = "button"; b.className = "thumb";
    const img = document.createElement("img");
    img.src = h.thumbnail_url; img.alt = `picture ${h.id}`; img.loading = "lazy";
    b.append(img);
    b.onclick = () => openDetail(h.id);
    return b;
  }));
  if (!items.length) el.textContent = "None.";
}

async function openDetail(id, textMatch) {
  try {
    const d = await api(`/api/images/${id}`);
    current = d;
    $("detail-title").textContent = d.original_name || `Picture ${id}`;
    const img = $("detail-img");
    img.src = d.file_url; img.alt = d.original_name || `picture ${id}`;
    const dl = $("detail-facts"); dl.replaceChildren();
    fact(dl, "Size", `${d.width} × ${d.height}, ${(d.size_bytes / 1024).toFixed(0)} KB, ${d.format}`);
    fact(dl, "Taken", d.taken_at && new Date(d.taken_at).toLocaleString());
    fact(dl, "Added", new Date(d.created_at).toLocaleString());
    fact(dl, "Camera", [d.camera?.make, d.camera?.model, d.camera?.lens].filter(Boolean).join(" · "));
    fact(dl, "Place", d.location && `${d.location.lat.toFixed(4)}, ${d.location.lon.toFixed(4)}`);
    fact(dl, "Albums", d.albums?.join(", "));
    for (const [k, v] of Object.entries(d.exif || {})) if (!["Make", "Model", "DateTimeOriginal"].includes(k)) fact(dl, k, v);
    $("detail-tags").value = d.tags.join(", ");
    $("detail-text").textContent = d.text?.content || (d.text ? "No text found." : "Not read (OCR is off, or the picture is still being processed).");
    $("detail-download").href = d.file_url;
    drawBoxes(d, textMatch);
    if (!dialog.open) dialog.showModal();
    $("detail-close").focus();
    api(`/api/images/${id}/similar?limit=12`).then((r) => strip($("detail-similar"), r.hits)).catch(() => {});
    api(`/api/images/${id}/duplicates`).then((r) => strip($("detail-dups"), r.duplicates)).catch(() => {});
  } catch (e) { statusEl.textContent = e.message; }
}

function drawBoxes(d, textMatch) {
  // Word boxes over the picture (in its pixels, scaled with it); the words that matched are highlighted.
  const layer = $("detail-boxes");
  layer.replaceChildren();
  const matched = new Set((textMatch?.matched || []).map((w) => w.toLowerCase()));
  for (const w of d.text?.words || []) {
    const [x, y, bw, bh] = w.box;
    const box = document.createElement("span");
    box.className = "box" + (matched.has(w.text.toLowerCase()) ? " hit" : "");
    box.style.left = `${(100 * x) / d.width}%`; box.style.top = `${(100 * y) / d.height}%`;
    box.style.width = `${(100 * bw) / d.width}%`; box.style.height = `${(100 * bh) / d.height}%`;
    box.title = `${w.text} (${Math.round(w.conf)}%)`;
    layer.append(box);
  }
}

$("detail-close").onclick = () => dialog.close();
$("detail-more").onclick = () => { dialog.close(); addTerm({ image_id: current.id, weight: 1 }); };
$("detail-save").onclick = async () => {
  const tags = list($("detail-tags").value);
  try { await api(`/api/images/${current.id}`, { method: "PATCH", headers: { "content-type": "application/json" }, body: JSON.stringify({ tags }) }); statusEl.textContent = "Tags saved."; }
  catch (e) { statusEl.textContent = e.message; }
};
$("detail-delete").onclick = async () => {
  if (!confirm(`Delete “${current.original_name || current.id}” from the library? This cannot be undone.`)) return;
  try { await api(`/api/images/${current.id}`, { method: "DELETE" }); dialog.close(); grid.querySelector(`[data-id="${current.id}"]`)?.remove(); statusEl.textContent = "Deleted."; }
  catch (e) { statusEl.textContent = e.message; }
};

// ---------------------------------------------------------------- cutoff, keyboard, infinite scroll, banner

$("cutoff").oninput = (ev) => {
  state.cutoff = Number(ev.target.value);
  $("cutoff-value").textContent = state.cutoff.toFixed(2);
  grid.querySelectorAll("figure").forEach(applyCutoff);
  const hidden = grid.querySelectorAll("figure[hidden]").length;
  $("cutoff-label").title = hidden ? `${hidden} result(s) below the cutoff are hidden` : "";
  if (hidden && !grid.querySelector("figure:not([hidden])")) statusEl.textContent = "Every result here scores below the cutoff.";
};

grid.addEventListener("keydown", (ev) => {
  // Arrows move through the results; up and down pick the nearest card in the row above or below.
  const cards = [...grid.querySelectorAll("figure:not([hidden])")];
  const i = cards.indexOf(document.activeElement);
  if (i < 0 || !["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp"].includes(ev.key)) return;
  ev.preventDefault();
  if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
    cards[Math.min(cards.length - 1, Math.max(0, i + (ev.key === "ArrowRight" ? 1 : -1)))].focus();
    return;
  }
  const here = cards[i].getBoundingClientRect();
  const cx = here.left + here.width / 2;
  const down = ev.key === "ArrowDown";
  const rowTops = [...new Set(cards.map((c) => Math.round(c.getBoundingClientRect().top)))].sort((a, b) => a - b);
  const row = rowTops.indexOf(Math.round(here.top)) + (down ? 1 : -1);
  if (row < 0 || row >= rowTops.length) return;
  const inRow = cards.filter((c) => Math.round(c.getBoundingClientRect().top) === rowTops[row]);
  const best = inRow.reduce((a, c) => {
    const r = c.getBoundingClientRect(), d = Math.abs(r.left + r.width / 2 - cx);
    return d < a.d ? { c, d } : a;
  }, { c: inRow[0], d: Infinity }).c;
  best.focus();
  best.scrollIntoView({ block: "nearest" });
});

new IntersectionObserver((entries) => { if (entries[0].isIntersecting && state.cursor) page(false); }, { rootMargin: "600px" }).observe($("sentinel"));

api("/api/health").then((h) => {
  const demo = h.warnings.find((w) => w.code === "demo_model");
  if (demo) { $("banner").textContent = demo.message; $("banner").hidden = false; }
}).catch(() => {});

window.onpopstate = fromUrl;
fromUrl();
