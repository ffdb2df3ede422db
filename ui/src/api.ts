// The gateway's API as the UI uses it: the session (and its CSRF token),
// JSON calls under /api, and the live event stream with resume.

export interface Session {
  user: string;
  scopes: string[];
  canWrite: boolean;
  csrf: string;
  login: string;
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
  ) {
    super(message);
  }
}

export let session: Session | null = null;

/** Off to the login, coming back to where we are. */
export function relogin(): never {
  const back = location.pathname + location.search;
  location.assign("/auth/login?return_to=" + encodeURIComponent(back));
  throw new ApiError(401, "unauthorized", "logging in");
}

export async function loadSession(): Promise<Session> {
  const r = await fetch("/auth/session", { credentials: "same-origin" });
  if (r.status === 401) relogin();
  if (!r.ok) throw new ApiError(r.status, "session", `the session check answered ${r.status}`);
  session = (await r.json()) as Session;
  return session;
}

async function answer<T>(r: Response): Promise<T> {
  if (r.status === 401) relogin();
  const text = await r.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { message: text };
  }
  // A command's 502 (the service's error) and 504 (timeout) carry its
  // outcome: they are answers. Any other failure is an error.
  const b = (body ?? {}) as { error?: string; message?: string; outcome?: string };
  if (!r.ok && !((r.status === 502 || r.status === 504) && b.outcome)) {
    throw new ApiError(r.status, b.error ?? "error", b.message ?? `HTTP ${r.status}`);
  }
  return body as T;
}

export async function get<T>(path: string): Promise<T> {
  // The CSRF token goes on reads too: some (a service's tools) make the
  // gateway send the service something.
  const r = await fetch("/api" + path, {
    credentials: "same-origin",
    headers: { accept: "application/json", "x-tether-csrf": session?.csrf ?? "" },
  });
  return answer<T>(r);
}

/** A state-changing call: the session's CSRF token goes with it. */
export async function post<T>(path: string, body: unknown): Promise<T> {
  const r = await fetch("/api" + path, {
    method: "POST",
    credentials: "same-origin",
    headers: {
      accept: "application/json",
      "content-type": "application/json",
      "x-tether-csrf": session?.csrf ?? "",
    },
    body: JSON.stringify(body),
  });
  return answer<T>(r);
}

export async function logout(): Promise<void> {
  const r = await fetch("/auth/logout", {
    method: "POST",
    credentials: "same-origin",
    headers: { "x-tether-csrf": session?.csrf ?? "" },
  });
  const b = (await r.json().catch(() => ({}))) as { providerLogout?: string | null };
  location.assign(b.providerLogout ?? "/auth/login");
}

export interface RegistryEvent {
  type: "event";
  seq: number;
  epoch: string;
  at: string;
  kind: string;
  runtimeInstanceId: string;
  serviceId: string;
  reason?: string;
  /** The node it happened on, when the controller runs in a cluster. */
  node?: string;
}

/** `GET /cluster`: this node's view of the others (404 when it runs alone). */
export interface ClusterStatus {
  node: string;
  stale: boolean;
  lastError: string | null;
  localInstances: number;
  remoteInstances: number;
  nodes: { node: string; instances: number; live: boolean; self: boolean; epoch: string }[];
}

/** The cluster's status, or null when this controller runs alone. */
export async function clusterStatus(): Promise<ClusterStatus | null> {
  try {
    return await get<ClusterStatus>("/cluster");
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) return null;
    throw e;
  }
}

type Listener = (e: RegistryEvent) => void;

/**
 * One WebSocket to /api/events, reconnecting by itself. After a drop it
 * resumes with `since` and the event epoch; when the controller restarted
 * (another epoch) or the events are no longer kept, the resume is refused
 * and the stream starts afresh, telling `onReset` so views reload.
 */
export class Live {
  private epoch: string | null = null;
  private seq: number | null = null;
  private listeners: Listener[] = [];
  private resets: (() => void)[] = [];
  private failures = 0;
  /** The next stream starts afresh rather than resuming. */
  private restart = false;
  private stamps: number[] = [];
  connected = false;
  /** The merged stream of every node of a cluster (`scope=cluster`): it
   * starts live, so a reconnect starts afresh (views reload). */
  cluster = false;
  /** The nodes whose events the merged stream carries now. */
  nodes = new Set<string>();
  private streams = 0;
  onState: (connected: boolean) => void = () => {};

  on(f: Listener): () => void {
    this.listeners.push(f);
    return () => (this.listeners = this.listeners.filter((l) => l !== f));
  }

  onReset(f: () => void): () => void {
    this.resets.push(f);
    return () => (this.resets = this.resets.filter((l) => l !== f));
  }

  /** Events per second over the last 10 s. */
  rate(): number {
    const since = Date.now() - 10_000;
    this.stamps = this.stamps.filter((t) => t >= since);
    return this.stamps.length / 10;
  }

  connect(): void {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}/api/events`;
    const resuming = !this.cluster && this.epoch !== null && this.seq !== null && !this.restart;
    if (this.cluster) url += "?scope=cluster";
    else if (resuming) url += `?since=${this.seq}&epoch=${encodeURIComponent(this.epoch!)}`;
    // The merged stream's first hello is this node's; the others' follow.
    let hellos = 0;
    const seen = new Set<string>();
    const stream = ++this.streams;
    const ws = new WebSocket(url, ["tether.v1", "csrf." + (session?.csrf ?? "")]);
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this.restart = false;
      this.failures = 0;
      this.connected = true;
      this.onState(true);
    };
    ws.onmessage = (m) => {
      const v = JSON.parse(String(m.data));
      if (v.type === "hello" && this.cluster) {
        // A reconnect, or a node followed again after a gap in its events
        // (cut, restarted): the views reload.
        const first = hellos++ === 0;
        if (first) this.nodes.clear();
        if ((first && stream > 1) || seen.has(v.node)) this.resets.forEach((f) => f());
        seen.add(v.node);
        this.epoch = this.epoch ?? v.epoch;
        if (v.node) this.nodes.add(v.node);
        this.onState(true);
      } else if ((v.type === "node_left" || v.type === "node_cut") && this.cluster) {
        this.nodes.delete(v.node);
        this.onState(true);
      } else if (v.type === "hello") {
        // A fresh start after an earlier stream (a refused resume, a
        // restart's new epoch): views reload. Not the first stream: the
        // views have just loaded.
        const fresh = this.epoch !== null && (!resuming || v.epoch !== this.epoch);
        this.epoch = v.epoch;
        this.seq = v.seq;
        if (fresh) this.resets.forEach((f) => f());
      } else if (v.type === "event") {
        this.seq = v.seq;
        this.stamps.push(Date.now());
        if (this.stamps.length > 100_000) this.stamps.splice(0, 50_000);
        this.listeners.forEach((f) => f(v as RegistryEvent));
      }
    };
    ws.onclose = (ev) => {
      // 1008: the session ended (logout elsewhere, expiry), or this page
      // read too slowly and was cut; a session check logs in if need be.
      if (ev.code === 1008) void loadSession().catch(() => {});
      this.connected = false;
      this.onState(false);
      if (!opened) {
        this.failures++;
        // A refused upgrade may be an ended session: a 401 here logs in.
        void loadSession().catch(() => {});
      }
      // A refused resume (a restart's new epoch, events no longer kept)
      // looks like a failed open: after two, start afresh.
      if (this.failures >= 2) {
        // Start afresh (the next hello resets the views).
        this.seq = null;
        this.restart = true;
      }
      const wait = Math.min(10_000, 500 * 2 ** Math.min(this.failures, 5));
      setTimeout(() => this.connect(), wait);
    };
  }
}

export const live = new Live();
