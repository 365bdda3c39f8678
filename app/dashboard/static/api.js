// The service's JSON API, same origin. The API key lives in sessionStorage (this tab only) and travels only
// in the Authorization header, never in a URL.

const KEY_STORAGE = "must.apiKey";

export function apiKey() { return sessionStorage.getItem(KEY_STORAGE); }
export function keepApiKey(key) { sessionStorage.setItem(KEY_STORAGE, key); }
export function forgetApiKey() { sessionStorage.removeItem(KEY_STORAGE); }

// What a 401 on the key in use does (the page signs out); set once by the page.
let unauthorized = () => {};
export function onUnauthorized(handler) { unauthorized = handler; }

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.param = error.param || null;
  }
}


async function parseError(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  return new ApiError(response.status, body);
}

export async function api(path, { method = "GET", body, key = apiKey(), raw = false } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  let payload = body;
  if (body && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  if (!response.ok) {
    const error = await parseError(response);
    if (response.status === 401 && key === apiKey()) unauthorized(error.message);
    throw error;
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

// A multipart POST with upload progress (fetch cannot report it).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
    request.upload.onprogress = (event) => { if (event.lengthComputable) onProgress(event.loaded / event.total); };
    request.onload = () => {
      let body = null;
      try { body = JSON.parse(request.responseText); } catch (_) { /* not JSON */ }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new ApiError(request.status, body));
    };
    request.onerror = () => reject(new ApiError(0, { error: { code: "network_error", message: "the upload did not reach the service" } }));
    request.send(form);
  });
}
