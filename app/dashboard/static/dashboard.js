// The team dashboard: plain JavaScript over the service's JSON API (same origin): views, routing and pages.
// api.js talks to the service, dom.js and charts.js draw, results.js fills the results page; this module owns
// routing and the other pages.

import { ApiError, api, apiKey, forgetApiKey, keepApiKey, onUnauthorized, upload } from "./api.js";
import { COLORS, barChart, lineChart } from "./charts.js";
import { $, $$, bytes, clearErrors, duration, el, pct, showError, statusBadge, toast, when } from "./dom.js";
import { downloadArtifact, loadAudits, renderGallery, renderReport } from "./results.js";

const FINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 1500;
const MODELS_PAGE = 50;  // the Models page pages on with "Older..."; Try-it lists the newest page

// ---- views and routing --------------------------------------------------------------------------

// Polling belongs to the view that started it: a view still loading when the user moves on (its `view`
// number is no longer the current one) starts none, and moving on stops the others.
const timers = new Set();
let currentView = 0;
function every(view, ms, fn) {
  if (view !== currentView) return null;
  const id = setInterval(fn, ms);
  timers.add(id);
  return id;
}
function stopTimers() { timers.forEach(clearInterval); timers.clear(); }

function go(hash) {
  if (location.hash === hash) route(); else location.hash = hash;  // hashchange routes
}

function show(view) {
  $$(".view").forEach((node) => { node.hidden = node.id !== `view-${view}`; });
  $$("[data-nav]").forEach((link) => link.classList.toggle("active", view.startsWith(link.dataset.nav.replace(/s$/, ""))));
}

function signOut(message) {
  forgetApiKey();
  $("#nav").hidden = true;
  go("#/signin");
  if (message) $('[data-error-for="key"]').textContent = message;
}

function route() {
  stopTimers();
  currentView += 1;
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (!apiKey()) { show("signin"); $("#api-key").focus(); return; }
  $("#nav").hidden = false;
  const [page, id, sub] = parts;
  const view = currentView;
  if (page === "adaptations" && id && sub === "results") return showResults(view, id);
  if (page === "adaptations" && id) return showAdaptation(view, id);
  if (page === "models") return showModels();
  if (page === "try") return showTry(id);
  return showAdaptations(view);
}

// ---- sign in ------------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const form = $("#signin-form");
  clearErrors(form);
  const key = $("#api-key").value.trim();
  try {
    await api("/adaptations?limit=1", { key });  // a cheap call that any valid key may make
  } catch (error) {
    showError(form, error, "key");
    return;
  }
  keepApiKey(key);
  $("#api-key").value = "";
  go("#/adaptations");
}

// ---- adaptations --------------------------------------------------------------------------------

function adaptationRow(a) {
  const bar = el("progress", { max: 1, value: a.status === "succeeded" ? 1 : a.progress.fraction || 0 });
  return el("tr", { "data-id": a.id },
    el("td", {}, el("a", { href: `#/adaptations/${a.id}` }, a.id)),
    el("td", {}, a.class_names.join(", ")),
    el("td", {}, a.num_images ?? "-"),
    el("td", {}, statusBadge(a.status)),
    el("td", {}, bar),
    el("td", {}, when(a.created_at)));
}

// A newest-first list of the API in a table: the first page, then "Older..." appends the next one.
async function loadRows(list, after) {
  const page = await api(`${list.path}?limit=${list.size}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
  const body = $(list.body);
  if (!after) body.replaceChildren();
  page.data.forEach((item) => body.append(list.row(item)));
  if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: list.columns, class: "muted" }, list.empty)));
  const more = $(list.more);
  more.hidden = !page.has_more;
  more.onclick = () => loadRows(list, page.data[page.data.length - 1].id);
}

const ADAPTATIONS = { path: "/adaptations", size: 20, body: "#adaptation-rows", more: "#adaptations-more",
  row: adaptationRow, columns: 6, empty: "None yet: start one on the left." };

async function showAdaptations(view) {
  show("adaptations");
  await loadRows(ADAPTATIONS);
  every(view, POLL_MS * 2, async () => {
    const active = $$("#adaptation-rows .status").some((s) => !FINAL.includes(s.textContent));
    if (active) await loadRows(ADAPTATIONS);
  });
}

function classNamesOf(text) {
  const trimmed = text.trim();
  if (trimmed.startsWith("[")) return trimmed;  // already a JSON array: the API checks it
  return JSON.stringify(trimmed.split(/[\n,]/).map((s) => s.trim()).filter(Boolean));
}

async function createAdaptation(event) {
  event.preventDefault();
  const form = $("#create-form");
  clearErrors(form);
  const fields = form.elements;
  let config = {};
  if (fields.config.value.trim()) {
    try { config = JSON.parse(fields.config.value); } catch (error) {
      showError(form, { param: "config", message: `not valid JSON: ${error.message}` });
      return;
    }
  }
  config = { preset: fields.preset.value, ...config };
  if (fields.epochs.value) config.epochs = Number(fields.epochs.value);
  const data = new FormData();
  data.append("class_names", classNamesOf(fields.class_names.value));
  for (const file of fields.images.files) data.append("images", file, file.name);
  if (fields.base_model.value.trim()) data.append("base_model", fields.base_model.value.trim());
  data.append("config", JSON.stringify(config));
  const bar = $("#upload-progress");
  const button = $("button[type=submit]", form);
  bar.hidden = false; bar.value = 0; button.disabled = true;
  try {
    const created = await upload("/adaptations", data, (fraction) => { bar.value = fraction; });
    form.reset();
    location.hash = `#/adaptations/${created.id}`;
  } catch (error) {
    if (error.status === 401) signOut(error.message); else showError(form, error);
  } finally {
    bar.hidden = true; button.disabled = false;
  }
}

// ---- one adaptation, live -----------------------------------------------------------------------

const LOSS_PARTS = ["loss", "loss_st", "loss_mim", "loss_align", "loss_fair"];

function renderSignals(events, classNames) {
  const progress = events.filter((e) => e.type === "progress" && e.data && e.data.metrics);
  const seriesOf = (name, color) => ({
    name, color,
    points: progress.filter((e) => Number.isFinite(e.data.metrics[name])).map((e) => [e.data.step, e.data.metrics[name]]),
  });
  lineChart($("#chart-loss"), LOSS_PARTS.map((name, i) => seriesOf(name, COLORS[i])).filter((s) => s.points.length));
  lineChart($("#chart-tau"), [seriesOf("above_tau", COLORS[0])], { min: 0, max: 1 });
  lineChart($("#chart-agreement"), [seriesOf("agreement", COLORS[2])], { min: 0, max: 1 });
  lineChart($("#chart-entropy"), [seriesOf("pseudo_label_entropy", COLORS[3])], { min: 0, max: 1 });
  const latest = progress.filter((e) => Array.isArray(e.data.pseudo_labels)).pop();
  if (latest) {
    $("#pseudo-window").textContent = `share of the confident pseudo-labels, at step ${latest.data.step}`;
    barChart($("#chart-pseudo"), classNames.map((name, i) => ({ label: name, values: [latest.data.pseudo_labels[i] || 0] })), ["share"], pct);
  } else {
    $("#chart-pseudo").replaceChildren(el("p", { class: "muted" }, "no confident pseudo-labels yet"));
  }
  $("#ad-events").replaceChildren(...events.map((e) => el("li", {},
    `${new Date(e.created_at).toLocaleTimeString()} ${e.type}`,
    e.message ? `: ${e.message}` : "",
    e.type === "progress" && e.data ? ` step ${e.data.step}/${e.data.total_steps}` : "")));
}

// Time left at the pace of the training steps seen so far (the first progress event starts the clock,
// so loading the model and the images does not count as training).
function eta(a, events) {
  const p = a.progress;
  const first = events.find((e) => e.type === "progress" && e.data && e.data.step > 0);
  if (!first || p.step <= first.data.step || p.step >= p.total_steps) return "";
  const seconds = (Date.now() - new Date(first.created_at).getTime()) / 1000;
  const perStep = seconds / (p.step - first.data.step);
  return `about ${duration(perStep * (p.total_steps - p.step))} left`;
}

function renderAdaptation(a, events = []) {
  $("#ad-id").textContent = a.id;
  const badge = $("#ad-status");
  badge.className = `status ${a.status}`;
  badge.textContent = a.status;
  const p = a.progress;
  $("#ad-progress").value = a.status === "succeeded" ? 1 : p.fraction || 0;
  $("#ad-step").textContent = p.total_steps ? `step ${p.step} of ${p.total_steps} (epoch ${p.epoch} of ${p.epochs})` : a.status;
  $("#ad-eta").textContent = a.status === "running" ? eta(a, events) : "";
  $("#ad-summary").textContent = `${a.class_names.join(", ")} - ${a.num_images ?? "?"} images - ${a.base_model} - preset ${a.config.preset ?? "auto"}, ${a.config.epochs ?? "?"} epochs`;
  $("#ad-error").textContent = a.error ? `${a.error.message} (${a.error.code})` : "";
  $("#ad-cancel").hidden = FINAL.includes(a.status) || a.cancel_requested;
  const results = $("#ad-results");
  results.hidden = a.status !== "succeeded";
  results.href = `#/adaptations/${a.id}/results`;
}

async function showAdaptation(view, id) {
  show("adaptation");
  const events = [];
  let last = null;
  const refresh = async () => {
    const a = await api(`/adaptations/${encodeURIComponent(id)}`);
    for (;;) {
      const page = await api(`/adaptations/${encodeURIComponent(id)}/events?limit=1000${last === null ? "" : `&after=${last}`}`);
      events.push(...page.data);
      if (page.data.length) last = page.data[page.data.length - 1].id;
      if (!page.has_more) break;
    }
    if (view === currentView) {  // the user may have moved on while this was loading
      renderAdaptation(a, events);
      renderSignals(events, a.class_names);
    }
    return a;
  };
  $("#ad-cancel").onclick = async () => {
    try { renderAdaptation(await api(`/adaptations/${encodeURIComponent(id)}/cancel`, { method: "POST" })); } catch (error) { toast(error.message); }
  };
  const first = await refresh();
  if (!FINAL.includes(first.status)) {
    const timer = every(view, POLL_MS, async () => {
      const a = await refresh();
      if (FINAL.includes(a.status)) { clearInterval(timer); timers.delete(timer); }
    });
  }
}

async function showResults(view, adaptationId) {
  show("results");
  $("#res-back").href = `#/adaptations/${adaptationId}`;
  const adaptation = await api(`/adaptations/${encodeURIComponent(adaptationId)}`);
  if (!adaptation.model_id) { $("#res-model").textContent = `(the adaptation is ${adaptation.status})`; return; }
  const model = await api(`/models/${encodeURIComponent(adaptation.model_id)}`);
  $("#res-model").textContent = model.id;
  renderReport(model);
  renderGallery(model);
  $("#gal-changed").onchange = $("#gal-unknown").onchange = () => renderGallery(model);
  const watch = async () => {
    const audits = await loadAudits(model.id);
    return audits.some((e) => !FINAL.includes(e.status));
  };
  let pending = await watch();
  every(view, POLL_MS, async () => { if (pending) pending = await watch(); });
  $("#audit-form").onsubmit = async (event) => {
    event.preventDefault();
    const form = $("#audit-form");
    clearErrors($("#view-results"));
    const data = new FormData();
    for (const file of form.elements.images.files) data.append("images", file, file.name);
    try {
      await upload(`/models/${encodeURIComponent(model.id)}/evaluations`, data, () => {});
      form.reset();
      pending = await watch();
    } catch (error) { showError($("#view-results"), error, "audit"); }
  };
}


// ---- models -------------------------------------------------------------------------------------

function modelRow(m) {
  const est = m.report && m.report.estimated_top1;
  return el("tr", { "data-id": m.id },
    el("td", {}, el("a", { href: `#/adaptations/${m.adaptation_id}/results` }, m.id)),
    el("td", {}, m.class_names.join(", ")),
    el("td", {}, m.base_model),
    el("td", {}, est ? `${pct(est.adapted)} (zero-shot ${pct(est.zero_shot)})` : "-"),
    el("td", {}, bytes(m.artifact_bytes)),
    el("td", {}, when(m.created_at)),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "secondary download", onclick: () => downloadArtifact(m.id) }, "Download"), " ",
      el("a", { class: "button secondary", href: `#/try/${m.id}` }, "Try"), " ",
      el("button", { type: "button", class: "danger delete", onclick: () => deleteModel(m) }, "Delete")));
}

const MODELS = { path: "/models", size: MODELS_PAGE, body: "#model-rows", more: "#models-more",
  row: modelRow, columns: 7, empty: "No models yet: an adaptation that succeeds makes one." };

async function showModels() {
  show("models");
  await loadRows(MODELS);
}

async function deleteModel(model) {
  if (!window.confirm(`Delete model ${model.id} (${model.class_names.join(", ")})? Its artifact and audits go too.`)) return;
  try {
    await api(`/models/${encodeURIComponent(model.id)}`, { method: "DELETE" });
    toast(`Deleted ${model.id}`);
  } catch (error) { showError($("#view-models"), error, "models"); }
  await showModels();
}

// ---- try it -------------------------------------------------------------------------------------

function predictionBars(container, predictions) {
  barChart(container, predictions.map((p) => ({ label: p.label, values: [p.score] })), ["score"], pct);
}

async function classify(file) {
  const view = $("#view-try");
  clearErrors(view);
  const select = $("#try-model");
  const model = select.selectedOptions[0] && JSON.parse(select.selectedOptions[0].dataset.model);
  if (!model) { showError(view, { message: "no model to try yet" }, "try"); return; }
  const preview = $("#try-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const adapted = new FormData();
  adapted.append("images", file, file.name);
  const zeroShot = new FormData();
  zeroShot.append("images", file, file.name);
  zeroShot.append("class_names", JSON.stringify(model.class_names));
  zeroShot.append("base_model", model.base_model);
  $("#try-adapted").replaceChildren(el("p", { class: "muted" }, "classifying..."));
  $("#try-zero").replaceChildren();
  try {
    const [mine, base] = await Promise.all([
      api(`/models/${encodeURIComponent(model.id)}/classify`, { method: "POST", body: adapted }),
      api("/classify", { method: "POST", body: zeroShot }),
    ]);
    predictionBars($("#try-adapted"), mine.results[0].predictions);
    if (mine.results[0].unknown) {  // images of no known class (SPEC), where the service reports them
      $("#try-adapted").prepend(el("p", {}, el("span", { class: "badge" }, "unknown"), " like none of the classes",
        Number.isFinite(mine.results[0].ood_score) ? ` (ood score ${mine.results[0].ood_score.toFixed(2)})` : ""));
    }
    predictionBars($("#try-zero"), base.results[0].predictions);
  } catch (error) {
    $("#try-adapted").replaceChildren();
    showError(view, error, "try");
  }
}

async function showTry(modelId) {
  show("try");
  const page = await api(`/models?limit=${MODELS_PAGE}`);
  const models = page.data;
  if (modelId && !models.some((m) => m.id === modelId)) {  // an older model, reached from its row or a link
    models.unshift(await api(`/models/${encodeURIComponent(modelId)}`));
  }
  const select = $("#try-model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.id, "data-model": JSON.stringify(m), selected: m.id === modelId },
    `${m.id} - ${m.class_names.join(", ")}`)));
}

function setUpDrop() {
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) classify(file);
  });
  $("#try-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) classify(file);
    event.target.value = "";
  });
}

// ---- start --------------------------------------------------------------------------------------

onUnauthorized((message) => signOut(message));

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", signIn);
  $("#create-form").addEventListener("submit", createAdaptation);
  $("#sign-out").addEventListener("click", () => signOut());
  setUpDrop();
  window.addEventListener("hashchange", route);
  window.addEventListener("unhandledrejection", (event) => {
    if (event.reason instanceof ApiError && event.reason.status !== 401) toast(event.reason.message);
  });
  route();
});
