// The search page: every value from the server is put in the page as text (textContent), never as HTML. URLs are
// relative to the page, so it works behind a reverse proxy that serves it under a path (tools/serve.py --public-url).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const status = (msg, isError) => {
    $("status").textContent = msg;
    $("status").className = isError ? "error" : "";
  };

  async function call(body, isForm) {
    const opts = {method: "POST", body: isForm ? body : JSON.stringify(body)};
    if (!isForm) opts.headers = {"Content-Type": "application/json"};
    const t0 = performance.now();
    const r = await fetch("search", opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
    data.ms = performance.now() - t0;
    return data;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function show(data, label) {
    const list = $("results");
    list.replaceChildren();
    data.results.forEach((h, i) => {
      // id_str: the exact id (a JSON number above 2**53 is rounded by JavaScript: another item's id)
      const id = h.id_str !== undefined ? String(h.id_str) : String(h.id);
      const li = el("li");
      const card = el("button", "hit");
      card.type = "button";
      card.dataset.id = id;
      const caption = h.caption || "";
      const path = h.image_path || h.path || "";
      card.setAttribute("aria-label", "Result " + (i + 1) + ": more like this" + (caption ? " (" + caption + ")" : ""));
      if (h.thumb_url) {
        const img = el("img");
        img.alt = caption || path;
        img.loading = "lazy";
        img.src = h.thumb_url;
        card.append(img);
      }
      const head = el("div");
      head.append(el("span", "score", "#" + (i + 1) + " " + Number(h.score).toFixed(4)), " ",
                  el("span", "meta", "id " + id));
      card.append(head);
      if (caption) card.append(el("div", "cap", caption));
      if (path) card.append(el("div", "meta", path));
      card.addEventListener("click", () => run({id: id}, false, "more like id " + id));
      li.append(card);
      list.append(li);
    });
    status(data.results.length + " results for " + label + " in " + Math.round(data.ms) + " ms" +
           " (index " + data.index + ", generation " + data.generation + ")");
  }

  async function run(query, isForm, label) {
    const index = $("index").value, k = $("k").value;
    if (isForm) { query.append("index", index); query.append("k", k); }
    else { query.index = index; query.k = Number(k); }
    status("searching…");
    try { show(await call(query, isForm), label); }
    catch (e) { status(e.message, true); }
  }

  function searchFile(file) {
    if (!file) return;
    const q = $("query-img");
    if (q.src) URL.revokeObjectURL(q.src);
    q.src = URL.createObjectURL(file);
    $("query-view").hidden = false;
    const form = new FormData();
    form.append("image", file, file.name || "query");
    run(form, true, "image " + (file.name || ""));
  }

  // the server's limits (GET /indices): the longest text query and the most results it answers
  function applyLimits(limits) {
    if (limits.max_text_chars) $("text").maxLength = limits.max_text_chars;
    const maxK = Number(limits.max_k);
    if (!maxK) return;
    const k = $("k");
    const over = [...k.options].filter((o) => Number(o.value) > maxK);
    if (!over.length) return;
    const selected = over.includes(k.selectedOptions[0]);
    over.forEach((o) => o.remove());
    if (![...k.options].some((o) => Number(o.value) === maxK)) k.append(el("option", null, String(maxK)));
    if (selected) k.selectedIndex = k.options.length - 1;
  }

  async function init() {
    try {
      const r = await fetch("indices");
      const data = await r.json();
      applyLimits(data.limits || {});
      for (const ix of data.indices) {
        const o = el("option", null, ix.name + " (" + ix.kind + ", " + ix.ntotal + ")");
        o.value = ix.name;
        o.dataset.text = ix.text_queries ? "1" : "";
        $("index").append(o);
      }
      status(data.indices.length + " index(es) loaded");
    } catch (e) { status("cannot list the indexes: " + e.message, true); }
    $("query").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = $("text").value.trim();
      if (text) run({text: text}, false, "“" + text + "”");
    });
    $("file").addEventListener("change", () => searchFile($("file").files[0]));
    const drop = $("drop");
    drop.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); $("file").click(); }
    });
    drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      drop.classList.remove("over");
      if (ev.dataTransfer.files.length) searchFile(ev.dataTransfer.files[0]);
    });
  }
  init();
})();
