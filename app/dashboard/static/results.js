// The results page: the label-free report, the gallery of the bucket by predicted class, audits, downloads.

import { api } from "./api.js";
import { barChart, scoreHistogram } from "./charts.js";
import { $, el, pct, statusBadge, toast, when } from "./dom.js";

const GALLERY_PAGE = 24;

export function renderReport(model) {
  const r = model.report;
  const box = $("#res-report");
  if (!r) { box.replaceChildren(el("p", { class: "muted" }, "This model has no label-free report.")); return; }
  const est = r.estimated_top1 || {};
  const measured = est.measured_error || {};
  const skewed = r.estimated_top1_if_skewed;
  box.replaceChildren(el("dl", { class: "kv" },
    el("dt", {}, "Images in the bucket"), el("dd", {}, r.num_images),
    el("dt", {}, "Changed from zero-shot"), el("dd", { id: "rep-changed" }, pct(r.changed_from_zero_shot)),
    r.beyond_balancing ? [el("dt", {}, "Beyond balancing"), el("dd", { id: "rep-beyond" }, beyondLine(r.beyond_balancing))] : null,
    el("dt", {}, "Mean top-1 score"), el("dd", {}, `${pct(r.mean_top1_score.adapted)} adapted, ${pct(r.mean_top1_score.zero_shot)} zero-shot`),
    el("dt", {}, "Teacher-student agreement"), el("dd", {}, pct(r.teacher_student_agreement)),
    el("dt", {}, "Estimated top-1, adapted"), el("dd", { id: "rep-est-adapted" }, pct(est.adapted)),
    el("dt", {}, "Estimated top-1, zero-shot"), el("dd", { id: "rep-est-zero" }, pct(est.zero_shot)),
    el("dt", {}, "Estimator"), el("dd", {}, est.estimator ? `${est.estimator}, ${assumption(est.assumes)}` : "-"),
    skewed ? [el("dt", {}, "If the classes divide as zero-shot's labels do"),
      el("dd", { id: "rep-est-skewed" }, skewedLine(skewed))] : null,
    skewed && !skewed.same_order ? [el("dt", {}, "The two estimates"),
      el("dd", { id: "rep-disagree", class: "warn" }, "disagree about which model is better: the difference rests on ",
        "your classes being about equally frequent in the bucket")] : null,
    r.unknown ? [el("dt", {}, "Of no known class"), el("dd", { id: "rep-unknown" }, unknownLine(r))] : null),
  measured.summary ? el("p", { class: "muted" }, `How far to trust the estimate: ${measured.summary}.`) : null,
  skewed ? el("p", { class: "muted", id: "rep-skewed-trust" },
    `How far to trust the second estimate: ${skewed.measured_error.summary}. `,
    "If you know how your bucket divides, give it as ", el("code", {}, "class_prior"), ".") : null,
  r.unknown && r.unknown.histogram ? unknownChart(r.unknown) : null,
  el("p", {}, el("a", { href: `#/try/${model.id}` }, "Try this model"), " \u00b7 ",
    el("a", { id: "res-download", onclick: () => downloadArtifact(model.id) }, "Download artifact"), " \u00b7 ",
    el("a", { id: "res-csv", onclick: () => downloadPredictions(model.adaptation_id) }, "All predictions (CSV)")));
  const hist = r.class_histogram;
  barChart($("#res-histogram"), model.class_names.map((name) => ({ label: name, values: [hist.adapted[name] || 0, hist.zero_shot[name] || 0] })), ["adapted", "zero-shot"]);
}

function assumption(assumes) {
  return assumes === "class_prior" ? "assuming the classes divide as the job's class prior says" : "assuming balanced classes";
}

// The second hypothesis: the bucket divides as zero-shot's labels do (its three most frequent classes shown).
function skewedLine(skewed) {
  const top = Object.entries(skewed.class_shares).sort((a, b) => b[1] - a[1]);
  const shares = top.slice(0, 3).map(([name, share]) => `${name} ${Math.round(100 * share)}%`).join(", ");
  return `adapted ${pct(skewed.adapted)}, zero-shot ${pct(skewed.zero_shot)} (zero-shot's shares: ${shares}${top.length > 3 ? ", ..." : ""})`;
}

// What training changed that balancing zero-shot's classes over the bucket (no training at all) would not.
function beyondLine(beyond) {
  const to = beyond.target === "class_prior" ? " to the job's class prior" : "";
  return `balancing zero-shot's classes over the bucket${to} alone changes ${pct(beyond.class_balancing)}; ` +
    `the adapted model differs from that on ${pct(beyond.adapted_differs)}`;
}

function unknownLine(report) {
  const flagged = Math.round(report.unknown.share * report.num_images);
  return `${pct(report.unknown.share)} (${flagged} image${flagged === 1 ? "" : "s"}): ood score above ${report.unknown.threshold.toFixed(3)}`;
}

function unknownChart(unknown) {
  const chart = el("div", { id: "res-unknown-chart" });
  scoreHistogram(chart, unknown.histogram, unknown.threshold);
  return el("figure", { class: "chart" }, chart, el("figcaption", { class: "muted", id: "res-unknown-how" },
    "The ood score of every bucket image; right of the dashed line (the threshold): of no known class. ",
    unknown.how ? `${unknown.how} ` : "", "A request's ", el("code", {}, "min_score"), " m moves the line to 1 - m."));
}

// Thumbnails need the key, so they are fetched and shown as blob: URLs, a few at a time.
const thumbQueue = [];
const thumbUrls = [];
let thumbsInFlight = 0;
function loadThumb(img, url) {
  thumbQueue.push([img, url]);
  pumpThumbs();
}
function pumpThumbs() {
  while (thumbsInFlight < 4 && thumbQueue.length) {
    const [img, url] = thumbQueue.shift();
    thumbsInFlight += 1;
    api(url, { raw: true })
      .then((response) => response.blob())
      .then((blob) => { img.src = URL.createObjectURL(blob); thumbUrls.push(img.src); })
      .catch((error) => { img.alt = error.message; img.title = error.message; })
      .finally(() => { thumbsInFlight -= 1; pumpThumbs(); });
  }
}

function thumb(adaptationId, row) {
  const best = row.predictions[0], zero = row.zero_shot[0];
  const img = el("img", { alt: row.image, title: row.image });
  loadThumb(img, `/adaptations/${encodeURIComponent(adaptationId)}/images?name=${encodeURIComponent(row.image)}&size=128`);
  return el("figure", { class: `thumb${row.changed ? " changed" : ""}${row.unknown ? " unknown" : ""}`, "data-image": row.image },
    img,
    el("div", {}, `${best.label} ${pct(best.score)}`, row.unknown ? [" ", el("span", { class: "badge" }, "unknown")] : null),
    row.changed ? el("div", { class: "was" }, `zero-shot: ${zero.label} ${pct(zero.score)}`) : el("div", { class: "muted" }, "same as zero-shot"),
    el("div", { class: "name" }, row.image));
}

async function loadGroup(adaptationId, name, box, after) {
  const filters = `${$("#gal-changed").checked ? "&changed=true" : ""}${$("#gal-unknown").checked ? "&unknown=true" : ""}`;
  const page = await api(`/adaptations/${encodeURIComponent(adaptationId)}/predictions?limit=${GALLERY_PAGE}&label=${encodeURIComponent(name)}${filters}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
  const thumbs = $(".thumbs", box);
  page.data.forEach((row) => thumbs.append(thumb(adaptationId, row)));
  if (!thumbs.children.length) thumbs.append(el("p", { class: "muted" }, "no images"));
  const more = $(".more", box);
  more.hidden = !page.has_more;
  more.onclick = () => loadGroup(adaptationId, name, box, page.data[page.data.length - 1].image);
}

export function renderGallery(model) {
  const gallery = $("#gallery");
  gallery.replaceChildren();
  thumbQueue.length = 0;
  thumbUrls.splice(0).forEach((url) => URL.revokeObjectURL(url));
  const counts = (model.report && model.report.class_histogram.adapted) || {};
  model.class_names.forEach((name) => {
    const box = el("section", { class: "group", "data-class": name },
      el("h3", {}, name, " ", el("small", {}, counts[name] !== undefined ? `${counts[name]} images` : "")),
      el("div", { class: "thumbs" }),
      el("button", { type: "button", class: "link more", hidden: true }, "More..."));
    gallery.append(box);
    loadGroup(model.adaptation_id, name, box).catch((error) => box.append(el("p", { class: "error" }, error.message)));
  });
}

function confusionTable(scores) {
  const names = scores.class_names;
  const top = Math.max(1, ...scores.confusion.flat());
  return el("table", { class: "confusion" },
    el("tr", {}, el("th", {}, "true \\ predicted"), names.map((n) => el("th", {}, n))),
    scores.confusion.map((row, i) => el("tr", {}, el("th", {}, names[i]), row.map((count) => {
      const cell = el("td", {}, count);
      cell.style.backgroundColor = `rgba(47, 111, 222, ${(0.75 * count) / top})`;
      return cell;
    }))));
}

function renderAudit(evaluation) {
  const head = el("p", {}, statusBadge(evaluation.status), ` ${evaluation.id} - ${evaluation.n} labelled images - ${when(evaluation.created_at)}`);
  if (evaluation.status !== "succeeded") {
    return el("div", { class: "audit", "data-id": evaluation.id }, head, evaluation.error ? el("p", { class: "error" }, evaluation.error.message) : null);
  }
  const a = evaluation.adapted, z = evaluation.zero_shot;
  return el("div", { class: "audit", "data-id": evaluation.id }, head,
    el("dl", { class: "kv" },
      el("dt", {}, "Top-1"), el("dd", { class: "audit-top1" }, `${pct(a.top1)} adapted vs ${pct(z.top1)} zero-shot`),
      el("dt", {}, "Mean per class"), el("dd", {}, `${pct(a.mean_per_class)} adapted vs ${pct(z.mean_per_class)} zero-shot`)),
    el("div", { class: "columns" },
      el("div", {}, el("h3", {}, "Adapted"), confusionTable(a)),
      el("div", {}, el("h3", {}, "Zero-shot"), confusionTable(z))));
}

export async function loadAudits(modelId) {
  const page = await api(`/models/${encodeURIComponent(modelId)}/evaluations?limit=5`);
  $("#audits").replaceChildren(...page.data.map(renderAudit));
  return page.data;
}


// ---- downloads ----------------------------------------------------------------------------------

async function saveResponse(response, fallbackName) {
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = disposition.match(/filename="?([^";]+)"?/);
  const link = el("a", { href: URL.createObjectURL(await response.blob()), download: match ? match[1] : fallbackName });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

export async function downloadArtifact(modelId) {
  try {
    await saveResponse(await api(`/models/${encodeURIComponent(modelId)}/artifact`, { raw: true }), `${modelId}.zip`);
    toast(`Downloaded ${modelId}.zip`);
  } catch (error) { toast(error.message); }
}

async function downloadPredictions(adaptationId) {
  try {
    await saveResponse(await api(`/adaptations/${encodeURIComponent(adaptationId)}/predictions?format=csv`, { raw: true }), `${adaptationId}-predictions.csv`);
  } catch (error) { toast(error.message); }
}
