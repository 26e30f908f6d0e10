// The gateway's HTTP API: the key lives in sessionStorage (never in a URL) and goes out as a Bearer header.

const KEY = "agentspace.key";

export function getKey() {
  return sessionStorage.getItem(KEY);
}

export function setKey(key) {
  sessionStorage.setItem(KEY, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}, key = getKey()) {
  return { Authorization: `Bearer ${key}`, ...extra };
}

// A fetch of our own API (a path, same origin); the response, or an ApiError carrying the gateway's error.
export async function request(path, { method = "GET", body, key, signal } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }, key ?? getKey()), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    let code = `HTTP_${response.status}`;
    let message = response.statusText || "request failed";
    try {
      const data = await response.json();
      if (data && data.error) ({ code, message } = data.error);
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

// Shown where a cost was computed at the configured fallback price (the model has no known price).
export const FALLBACK_NOTE = 'Estimate: no known price for this model, costed at the fallback price (set [pricing."MODEL"] for exact costs)';

// What was spent, written as `agentspace usage` and `agentspace clients` write it (cli/common.py's money):
// 6 decimals below $1, 4 with thousands separators above -- the same figure in the web app as in the CLI.
export function spent(value) {
  const n = Number(value || 0);
  const digits = Math.abs(n) >= 1 ? 4 : 6;
  return `$${n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits, useGrouping: Math.abs(n) >= 1 })}`;
}
