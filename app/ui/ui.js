// Lethe's web UI: plain JavaScript over the same HTTP API as every other client.
// Job events come from GET /jobs/{id}/events, read with fetch so that the API key can go
// in a header (EventSource cannot send one).
"use strict";

const $ = (id) => document.getElementById(id);
const FINAL = ["succeeded", "failed", "canceled"];
const KEY = "lethe.key";

function headers(extra = {}) {
  const key = localStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function notice(text) {
  const box = $("notice");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  if (r.status === 401) {
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new Error("this service needs an API key: enter it above");
  }
  const data = r.status === 204 ? null : await r.json();
  if (!r.ok) throw new Error(data && data.error ? data.error.message : `HTTP ${r.status}`);
  return data;
}

// Reads the job's Server-Sent Events until its final one; resolves with that event.
async function follow(jobId, onEvent, signal) {
  let last = null;
  for (;;) {
    const h = headers(last ? { "Last-Event-ID": last } : {});
    const r = await fetch(`/jobs/${jobId}/events`, { headers: h, signal });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;  // dropped: reconnect after the last event seen
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const event = { event: "message", data: "" };
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith(":")) continue;
          const at = line.indexOf(":");
          const name = at < 0 ? line : line.slice(0, at);
          const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
          if (name === "data") event.data += (event.data ? "\n" : "") + value;
          else if (name === "event" || name === "id") event[name] = value;
        }
        if (!event.data) continue;
        event.data = JSON.parse(event.data);
        if (event.id) last = event.id;
        onEvent(event);
        if (FINAL.includes(event.event)) return event;
      }
    }
  }
}

async function imageURL(jobId, index) {
  const r = await fetch(`/jobs/${jobId}/images/${index}`, { headers: headers() });
  if (!r.ok) throw new Error(`image ${index} of job ${jobId}: HTTP ${r.status}`);
  return URL.createObjectURL(await r.blob());
}

function formBody(form) {
  const body = {};
  for (const el of form.elements) {
    if (!el.name || el.value === "") continue;
    body[el.name] = el.type === "number" ? Number(el.value) : el.value;
  }
  return body;
}

function showProgress(prefix, p) {
  if (!p) return;
  $(`${prefix}-progress`).value = p.total ? p.step / p.total : 0;
  const loss = p.loss != null ? `, loss ${p.loss.toFixed(4)}` : "";
  $(`${prefix}-status`).textContent = `${p.stage} ${p.step}/${p.total}${loss}`;
}

async function modelOptions(select, kind) {
  const models = (await api("GET", "/models")).data.filter((m) => m.kind === kind);
  const keep = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (keep) select.value = keep;
  return models;
}

// -- generate ------------------------------------------------------------------------
let generating = null;

async function generate(event) {
  event.preventDefault();
  notice("");
  const body = formBody($("generate-form"));
  const out = $("g-images");
  out.replaceChildren();
  const preview = $("g-preview");
  preview.dataset.frames = "0";
  $("g-preview-box").hidden = true;
  try {
    const job = await api("POST", "/generate", body);
    const abort = new AbortController();
    generating = { id: job.id, abort };
    $("g-cancel").disabled = false;
    $("g-status").textContent = "queued";
    const end = await follow(job.id, (e) => {
      if (e.event === "progress") showProgress("g", e.data);
      if (e.event === "preview") {
        preview.src = e.data.image;
        preview.dataset.frames = String(Number(preview.dataset.frames) + 1);
        $("g-preview-caption").textContent = `step ${e.data.step} of ${e.data.total}`;
        $("g-preview-box").hidden = false;
      }
    }, abort.signal);
    $("g-status").textContent = end.event;
    if (end.event === "succeeded") {
      $("g-progress").value = 1;
      for (const image of end.data.result.images) {
        const img = new Image();
        img.alt = `${body.prompt} (seed ${image.seed})`;
        img.src = await imageURL(job.id, image.index);
        out.append(img);
      }
      $("g-preview-box").hidden = true;
    } else if (end.data.error) {
      notice(end.data.error.message);
    }
  } catch (err) {
    if (err.name !== "AbortError") notice(err.message);
  } finally {
    generating = null;
    $("g-cancel").disabled = true;
  }
}

async function cancel(current) {
  if (!current) return;
  try { await api("DELETE", `/jobs/${current.id}`); } catch (err) { notice(err.message); }
}

// -- gallery -------------------------------------------------------------------------
// The key's own jobs (an admin key's: everyone's), newest first, from GET /jobs: the same
// gallery from any browser the key is used in.
async function gallery() {
  const box = $("gallery");
  box.replaceChildren();
  const page = await api("GET", "/jobs?limit=50");
  for (const job of page.data) {
    if (!["generate", "upscale", "erase"].includes(job.type)) continue;
    const params = job.params || {};
    const what = params.prompt || (params.concepts || []).join(", ");
    const card = document.createElement("div");
    card.className = "card";
    const title = document.createElement("p");
    title.textContent = `${job.type}: ${what} — ${job.status}`;
    card.append(title);
    for (const image of (job.result && job.result.images) || []) {
      const url = await imageURL(job.id, image.index);
      const img = new Image();
      img.src = url;
      img.alt = `${job.type} ${job.id} image ${image.index}`;
      const link = document.createElement("a");
      link.href = url;
      link.download = `${job.id}-${image.index}.png`;
      link.textContent = "Download";
      const up = document.createElement("button");
      up.type = "button";
      up.textContent = "Upscale ×4";
      up.addEventListener("click", async () => {
        try {
          const created = await api("POST", "/upscale", { source: { job_id: job.id, index: image.index } });
          up.disabled = true;
          await follow(created.id, () => {});
          gallery();
        } catch (err) { notice(err.message); }
      });
      card.append(img, link, up);
    }
    box.append(card);
  }
}

// -- erase ---------------------------------------------------------------------------
let erasing = null;

function drawLoss(points) {
  const svg = $("e-loss");
  if (points.length < 2) return;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 5 + 290 * (x - x0) / Math.max(1e-9, x1 - x0);
  const sy = (y) => 95 - 90 * (y - y0) / Math.max(1e-9, y1 - y0);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#0b57d0");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.replaceChildren(line);
  $("e-loss-box").hidden = false;
}

async function erase(event) {
  event.preventDefault();
  notice("");
  const body = formBody($("erase-form"));
  body.concepts = body.concepts.split(",").map((c) => c.trim()).filter(Boolean);
  const report = $("e-report");
  report.replaceChildren();
  $("e-loss-box").hidden = true;
  const points = [];
  try {
    const job = await api("POST", "/erase", body);
    const abort = new AbortController();
    erasing = { id: job.id, abort };
    $("e-cancel").disabled = false;
    $("e-status").textContent = "queued";
    const end = await follow(job.id, (e) => {
      if (e.event !== "progress") return;
      showProgress("e", e.data);
      if (e.data.loss != null) {
        points.push([e.data.step, e.data.loss]);
        drawLoss(points);
      }
    }, abort.signal);
    $("e-status").textContent = end.event;
    if (end.event === "succeeded") {
      $("e-progress").value = 1;
      await showReport(end.data, report);
    } else if (end.data.error) {
      notice(end.data.error.message);
    }
  } catch (err) {
    if (err.name !== "AbortError") notice(err.message);
  } finally {
    erasing = null;
    $("e-cancel").disabled = true;
  }
}

// A rate as a percentage, a gap in points; "—" where the judge gave none.
const pct = (v) => (v == null ? "—" : `${(100 * v).toFixed(0)}%`);
const points = (v) => (v == null ? "—" : `${v >= 0 ? "+" : ""}${(100 * v).toFixed(0)} points`);

async function showReport(job, box) {
  const model = await api("GET", `/models/${job.result.model}`);
  const heading = document.createElement("h3");
  heading.id = "e-report-title";
  heading.textContent = `Report: ${model.id} (${model.edit.method}, ${model.edit.iterations} iterations)`;
  const lines = [];
  const drift = model.evidence && model.evidence.drift;
  if (drift) lines.push(`Neighbours' same-seed drift: PSNR ${drift.psnr} dB, SSIM ${drift.ssim}`);
  const erasure = model.metrics && model.metrics.erasure;
  if (erasure && erasure.after) {
    const acc = Object.entries(erasure.after.accuracy || {})
      .map(([k, v]) => `${k} ${(100 * v).toFixed(0)}%`).join(", ");
    lines.push(`Accuracy after: ${acc}`);
    // The standard: the model retrained without the concept (lethe train --without).
    for (const [concept, ref] of Object.entries(erasure.references || {})) {
      if (!ref.model) {
        lines.push(`Against a model that never learned ${concept}: ${ref.note}`);
        continue;
      }
      lines.push(`Against ${ref.model}, retrained without ${concept}: drawn ${
        pct(erasure.after.accuracy[concept])} by the edit, ${pct(ref.accuracy[concept])} by the ` +
        `reference (gap ${points(ref.gap[concept])})`);
    }
  }
  for (const attack of model.attacks || []) {
    if (attack.reference) {
      lines.push(`Attacks on ${attack.concept}: worst ${pct(attack.worst)}, ` +
        `worst gap to ${attack.reference.model} ${points(attack.worst_gap)}`);
    } else if (attack.reference_note) {
      lines.push(`Attacks on ${attack.concept}: worst ${pct(attack.worst)}; ` +
        attack.reference_note);
    }
  }
  const list = document.createElement("ul");
  for (const text of lines) {
    const li = document.createElement("li");
    li.textContent = text;
    list.append(li);
  }
  box.append(heading, list);
  const grid = (job.result.images || []).find((i) => i.role === "grid");
  if (grid) {
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = await imageURL(job.id, grid.index);
    img.alt = "before and after: rows of prompts, columns base, edit, negative prompt, SLD";
    const caption = document.createElement("figcaption");
    caption.textContent = (model.evidence.columns || []).join(" · ");
    figure.append(img, caption);
    box.append(figure);
  }
}

// -- models --------------------------------------------------------------------------
async function models() {
  const all = (await api("GET", "/models")).data;
  const rows = [];
  const row = (m, child) => {
    const tr = document.createElement("tr");
    const edit = m.edit ? `${m.edit.method}: ${m.edit.concepts.join(", ")}` : "";
    for (const [text, cls] of [[child ? `↳ ${m.id}` : m.id, child ? "child" : ""],
      [m.kind, ""], [m.format, ""], [edit, ""],
      [m.visibility === "private" ? "owner" : "every key", ""], [m.created_at || "", ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  };
  const childrenOf = (id) => all.filter((m) => m.base && m.base.id === id);
  for (const m of all.filter((x) => !x.base)) {
    rows.push(row(m, false));
    for (const c of childrenOf(m.id)) rows.push(row(c, true));
  }
  $("models").replaceChildren(...rows);
}

// -- pages ---------------------------------------------------------------------------
async function route() {
  const page = (location.hash || "#generate").slice(1);
  for (const section of document.querySelectorAll("[data-page]")) {
    section.hidden = section.dataset.page !== page;
  }
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#${page}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (page === "generate") await modelOptions($("g-model"), "text-to-image");
    if (page === "erase") {
      const bases = (await modelOptions($("e-model"), "text-to-image")).filter((m) => !m.base);
      $("e-model").replaceChildren(...bases.map((m) => new Option(m.id, m.id)));
    }
    if (page === "gallery") await gallery();
    if (page === "models") await models();
  } catch (err) { notice(err.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate-form").addEventListener("submit", generate);
  $("erase-form").addEventListener("submit", erase);
  $("g-cancel").addEventListener("click", () => cancel(generating));
  $("e-cancel").addEventListener("click", () => cancel(erasing));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, $("api-key").value);
    notice("");
    route();
  });
  window.addEventListener("hashchange", route);
  route();
});
