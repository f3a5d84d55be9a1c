// The console's only door to the server: the same /api/v1 the CLI uses, signed in by
// a session cookie (HttpOnly: this code never sees it) and the session's CSRF token,
// sent back on every request that changes anything.

let csrf = null;

/** An API error: the problem+json answer's detail and status. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

/** Calls the API; answers the parsed JSON (or text), throws ApiError on a refusal. */
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") {
    if (csrf) headers["x-csrf-token"] = csrf;
  }
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, {
    method,
    headers,
    body: payload,
    credentials: "same-origin",
    cache: "no-store",
  });
  const type = resp.headers.get("content-type") || "";
  if (!resp.ok) {
    let detail = `${resp.status} ${resp.statusText}`;
    if (type.includes("json")) {
      const p = await resp.json();
      detail = p.detail || p.title || detail;
    }
    throw new ApiError(resp.status, detail);
  }
  if (resp.status === 204) return null;
  if (type.includes("json")) return resp.json();
  return resp.text();
}

/** Signs in with a key; the key goes in the body only and is not kept. */
export async function signIn(key) {
  const who = await api("POST", "/api/v1/sessions", { key });
  csrf = who.csrf_token;
  return who;
}

/** Who the session acts as, or null when there is none. */
export async function whoAmI() {
  try {
    const who = await api("GET", "/api/v1/sessions/current");
    csrf = who.csrf_token || null;
    return who;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return null;
    throw e;
  }
}

/** Signs out: the server ends the session. */
export async function signOut() {
  try {
    await api("DELETE", "/api/v1/sessions/current");
  } finally {
    csrf = null;
  }
}

/** Encodes an account path for a URL path (its slashes kept). */
export function pathPart(p) {
  return p.split("/").filter(Boolean).map(encodeURIComponent).join("/");
}

/** Whether the key has `scope`, as the server judges it (`admin` grants `read`). */
export function allows(who, scope) {
  return who.scopes.includes(scope) || (scope === "read" && who.scopes.includes("admin"));
}
