// Loupe's gallery: browse newest first, search by words or by an image, refine with more/less like this.
const $ = (id) => document.getElementById(id);
const grid = $("grid"), status = $("status"), more = $("more");
let terms = [];          // the current query terms ({text}|{image_id}|{vector}, weight)
let cursor = null;       // next page of the current view
let loading = false;

async function api(path, options = {}) {
  const res = await fetch(path, options);
  const body = res.status === 204 ? null : await res.json();
  if (!res.ok) throw new Error(body?.error?.message || `HTTP ${res.status}`);
  return body;
}

function card(item) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.original_name || `image ${item.id}`;
  img.src = item.thumbnail_url;
  img.onerror = () => { img.removeAttribute("src"); };
  const cap = document.createElement("figcaption");
  const label = document.createElement("span");
  label.textContent = item.score !== undefined ? item.score.toFixed(3) : (item.state === "ready" ? "" : item.state);
  cap.append(label);
  for (const [text, weight] of [["+", 1], ["−", -0.5]]) {
    const b = document.createElement("button");
    b.textContent = text;
    b.title = weight > 0 ? "More like this" : "Less like this";
    b.setAttribute("aria-label", `${b.title}: image ${item.id}`);
    b.onclick = () => { terms.push({ image_id: item.id, weight }); run(); };
    cap.append(b);
  }
  fig.append(img, cap);
  return fig;
}

function showTerms() {
  const box = $("terms");
  box.replaceChildren(...terms.map((t, i) => {
    const s = document.createElement("button");
    s.className = "term" + (t.weight < 0 ? " neg" : "");
    s.textContent = `${t.text ?? (t.image_id ? "image " + t.image_id : "uploaded image")} ×${t.weight}`;
    s.title = "Remove this term";
    s.onclick = () => { terms.splice(i, 1); terms.length ? run() : browse(); };
    return s;
  }));
}

async function page(reset) {
  if (loading) return;
  loading = true;
  try {
    let items, next;
    if (terms.length) {
      const body = await api("/api/search", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ query: terms, limit: 60, cursor: reset ? null : cursor }),
      });
      items = body.hits; next = body.next_cursor;
      status.textContent = reset ? (items.length ? `Results in ${body.timing_ms.total.toFixed(0)} ms` : "Nothing matches.") : status.textContent;
    } else {
      const q = new URLSearchParams({ limit: "60" });
      if (!reset && cursor) q.set("cursor", cursor);
      const body = await api("/api/images?" + q);
      items = body.images; next = body.next_cursor;
      if (reset) status.textContent = items.length ? "Newest first" : "No pictures yet: upload some.";
    }
    if (reset) grid.replaceChildren();
    grid.append(...items.map(card));
    cursor = next; more.hidden = !next;
  } catch (e) {
    status.textContent = e.message;
  } finally {
    loading = false;
  }
}

function run() { showTerms(); page(true); }
function browse() { terms = []; run(); }

$("search").onsubmit = (ev) => {
  ev.preventDefault();
  const q = $("q").value.trim();
  history.pushState(null, "", q ? "?q=" + encodeURIComponent(q) : "/");
  if (!q) return browse();
  terms = [{ text: q, weight: 1 }];
  run();
};
$("byimage").onchange = async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const fd = new FormData();
  fd.append("image", file);
  fd.append("query", JSON.stringify({ limit: 60 }));
  try {
    const body = await api("/api/search/image", { method: "POST", body: fd });
    terms = [body.query_term];  // later pages and refinements need no re-upload
    showTerms();
    grid.replaceChildren(...body.hits.map(card));
    cursor = body.next_cursor; more.hidden = !cursor;
    status.textContent = `Similar to ${file.name}`;
  } catch (e) { status.textContent = e.message; }
  ev.target.value = "";
};
$("upload").onchange = async (ev) => {
  const files = [...ev.target.files];
  if (!files.length) return;
  const fd = new FormData();
  files.forEach((f) => fd.append("file", f, f.name));
  status.textContent = `Uploading ${files.length} file(s)…`;
  try {
    const res = await fetch("/api/images", { method: "POST", body: fd });
    const body = await res.json();
    const r = body.files ? body : body.error?.detail;
    status.textContent = r ? `${r.accepted} accepted, ${r.duplicates} duplicates, ${r.rejected} rejected`
                           : body.error?.message;
    setTimeout(() => { if (!terms.length) browse(); }, 1500);
  } catch (e) { status.textContent = e.message; }
  ev.target.value = "";
};
more.onclick = () => page(false);
new IntersectionObserver((entries) => { if (entries[0].isIntersecting && cursor) page(false); }).observe(more);

api("/api/health").then((h) => {
  const demo = h.warnings.find((w) => w.code === "demo_model");
  if (demo) { $("banner").textContent = demo.message; $("banner").hidden = false; }
}).catch(() => {});
// A text search in the URL (?q=...) can be bookmarked and shared; back/forward restore it.
function fromUrl() {
  const q = new URLSearchParams(location.search).get("q");
  $("q").value = q || "";
  if (q) { terms = [{ text: q, weight: 1 }]; run(); } else browse();
}
window.onpopstate = fromUrl;
fromUrl();
