// Small DOM helpers, value formats, and where an API error is shown.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

export const pct = (value) => (value === null || value === undefined || Number.isNaN(value) ? "-" : `${(100 * value).toFixed(1)}%`);
export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");

export function bytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function statusBadge(status) { return el("span", { class: `status ${status}` }, status); }

export function toast(message) {
  const box = $("#toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

// Errors go next to the field the API names (`param`), else to the form's general slot.
export function clearErrors(root) {
  $$("[data-error-for]", root).forEach((node) => { node.textContent = ""; });
  $$(".field-error", root).forEach((node) => node.classList.remove("field-error"));
}

export function showError(root, error, fallback = "general") {
  const param = error.param || "";
  const slot = $(`[data-error-for="${CSS.escape(param)}"]`, root)
    || (param.startsWith("config.") && $('[data-error-for="config"]', root))
    || $(`[data-error-for="${fallback}"]`, root);
  const text = error.code ? `${error.message} (${error.code})` : error.message;
  if (slot) slot.textContent = text; else toast(text);
  const field = param && $(`[name="${CSS.escape(param.replace(/^config\./, ""))}"]`, root);
  if (field) field.classList.add("field-error");
}
