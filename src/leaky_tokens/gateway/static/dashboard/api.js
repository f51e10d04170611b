// The only way the dashboard reaches the server: the public API through this gateway, with the
// signed-in user's bearer token. The token lives in this module's memory only (never in
// localStorage or a cookie): reloading the page signs the user out.

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `request failed (HTTP ${status})`);
    this.status = status;
    this.body = body;
    this.code = body && body.code;
  }
}

let session = null;
let expiryTimer = null;
const listeners = new Set();

export function currentSession() {
  return session;
}

export function isAdmin() {
  return Boolean(session && session.roles.includes("ADMIN"));
}

export function onSessionChange(listener) {
  listeners.add(listener);
}

function changed(reason) {
  for (const listener of listeners) listener(session, reason);
}

async function parse(response) {
  if (response.status === 204) return null;
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { message: text.slice(0, 200) };
  }
}

export async function signIn(username, password) {
  const response = await fetch("/api/v1/auth/login", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ username, password }),
    credentials: "omit",
    cache: "no-store",
  });
  const body = await parse(response);
  if (!response.ok) throw new ApiError(response.status, body);
  session = {
    token: body.token,
    userId: body.userId,
    username: body.username,
    roles: body.roles || [],
    orgIds: [],
    expiresAt: Date.now() + (body.expiresIn || 3600) * 1000,
  };
  try {
    const me = await call("/api/v1/auth/me");
    session.orgIds = me.orgIds || [];
  } catch (error) {
    if (!session) throw error;
  }
  clearTimeout(expiryTimer);
  expiryTimer = setTimeout(
    () => signOut("Your session expired. Please sign in again."),
    Math.max(0, session.expiresAt - Date.now()),
  );
  changed(null);
  return session;
}

export function signOut(reason = null) {
  if (!session) return;
  session = null;
  clearTimeout(expiryTimer);
  changed(reason);
}

function urlOf(path, query) {
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url.pathname + url.search;
}

// `accept` lists error statuses whose body is still the answer (the gateway's /health is a
// 503 carrying the full report when an upstream is down).
export async function call(path, { method = "GET", query, body, headers = {}, accept = [] } = {}) {
  const held = session;
  if (!held) throw new ApiError(401, { message: "not signed in" });
  const response = await fetch(urlOf(path, query), {
    method,
    headers: {
      Accept: "application/json",
      Authorization: `Bearer ${held.token}`,
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
      ...headers,
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const parsed = await parse(response);
  if (response.status === 401) {
    if (session === held) signOut("Your session has expired. Please sign in again.");
    throw new ApiError(401, parsed);
  }
  if (session !== held) throw new ApiError(401, { message: "signed out" });
  if (!response.ok && !accept.includes(response.status)) throw new ApiError(response.status, parsed);
  return parsed;
}

// Every page of a paged list (contract 13), up to `limit` items.
export async function allPages(path, query = {}, limit = 500) {
  const items = [];
  for (let page = 1; items.length < limit; page += 1) {
    const body = await call(path, { query: { ...query, page, page_size: 100 } });
    items.push(...body.items);
    if (page >= body.pagination.total_pages) break;
  }
  return items;
}
