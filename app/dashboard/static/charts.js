// Charts as inline SVG, no library.

import { el } from "./dom.js";

export const COLORS = ["#2f6fde", "#e08a1e", "#1f9d55", "#a23bd1", "#d14343", "#0e9aa7"];

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

export function lineChart(container, series, { min, max } = {}) {
  container.replaceChildren();
  const points = series.flatMap((s) => s.points);
  if (!points.length) { container.append(el("p", { class: "muted" }, "waiting for the first steps...")); return; }
  const width = 280, height = 150, left = 34, bottom = 18, top = 6, right = 8;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = min ?? Math.min(...ys), y1 = max ?? Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img" });
  chart.append(svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }));
  for (const [value, y] of [[y1, top + 8], [y0, height - bottom]]) {
    const label = svg("text", { x: 2, y });
    label.textContent = Math.abs(value) >= 100 ? value.toFixed(0) : value.toFixed(2);
    chart.append(label);
  }
  const steps = svg("text", { x: width - right - 60, y: height - 4 });
  steps.textContent = `step ${x0}-${x1}`;
  chart.append(steps);
  series.forEach((s) => {
    if (!s.points.length) return;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    chart.append(svg("path", { d, fill: "none", stroke: s.color, "stroke-width": 2 }));
    if (s.points.length === 1) {
      chart.append(svg("circle", { cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.color }));
    }
  });
  container.append(chart);
  if (series.length > 1) {
    container.append(el("div", { class: "legend" }, series.filter((s) => s.points.length).map((s) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = s.color;
      return el("span", {}, swatch, s.name);
    })));
  }
}

// Horizontal bars: rows of {label, values: [number...]} drawn against the largest value.
export function barChart(container, rows, names, format = (v) => String(v)) {
  container.replaceChildren();
  const top = Math.max(1e-9, ...rows.flatMap((r) => r.values));
  const box = el("div", { class: "bars" });
  if (names.length > 1) {
    box.append(el("div", { class: "legend" }, names.map((name, i) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = i ? "#9aa5b8" : "#2f6fde";
      return el("span", {}, swatch, name);
    })));
  }
  rows.forEach((row) => {
    row.values.forEach((value, i) => {
      const fill = el("div", { class: i ? "fill zero" : "fill" });
      fill.style.width = `${(100 * value) / top}%`;
      box.append(el("div", { class: "bar-row" },
        el("span", { class: "label", title: row.label }, i ? "" : row.label), el("div", { class: "track" }, fill),
        el("span", {}, format(value))));
    });
  });
  container.append(box);
}

// Vertical bars of equal bins of [0, 1] (the bucket's ood scores), with the threshold as a dashed line:
// bins that reach past it are drawn in the warning colour, so a second group of images there stands out.
export function scoreHistogram(container, counts, threshold) {
  container.replaceChildren();
  const width = 280, height = 110, left = 4, right = 4, top = 6, bottom = 18;
  const top1 = Math.max(1, ...counts);
  const step = (width - left - right) / counts.length;
  const x = (score) => left + score * (width - left - right);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
    "aria-label": "ood score of every bucket image" });
  chart.append(svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }));
  counts.forEach((count, i) => {
    const h = ((height - top - bottom) * count) / top1;
    const bar = svg("rect", { class: (i + 1) / counts.length > threshold ? "bin above" : "bin",
      x: (left + i * step + 0.5).toFixed(1), y: (height - bottom - h).toFixed(1), width: (step - 1).toFixed(1),
      height: h.toFixed(1), "data-count": count });
    const tip = svg("title");
    tip.textContent = `${(i / counts.length).toFixed(2)}-${((i + 1) / counts.length).toFixed(2)}: ${count} images`;
    bar.append(tip);
    chart.append(bar);
  });
  if (threshold >= 0 && threshold <= 1) {
    chart.append(svg("line", { class: "threshold", x1: x(threshold), y1: top, x2: x(threshold), y2: height - bottom }));
  }
  for (const [label, at, anchor] of [["0: one class", left, "start"], ["1: like none", width - right, "end"]]) {
    const text = svg("text", { x: at, y: height - 4, "text-anchor": anchor });
    text.textContent = label;
    chart.append(text);
  }
  container.append(chart);
}
