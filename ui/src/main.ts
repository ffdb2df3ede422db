// tether's Admin UI: overview, the instance table (paged on the server,
// virtualized here), instance detail with its tools, and the live event
// feed; all through the gateway, live over one WebSocket.

import "./style.css";
import { ApiError, clusterStatus, get, live, loadSession, logout, post, session, type ClusterStatus, type RegistryEvent } from "./api";

const main = document.getElementById("main") as HTMLElement;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string | null | undefined)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") el.textContent = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function link(href: string, text: string, attrs: Record<string, string> = {}): HTMLAnchorElement {
  return h("a", { href, "data-link": "", ...attrs }, text);
}

function when(iso: string | undefined): string {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d.getTime()) ? iso : d.toLocaleString();
}

function fail(where: HTMLElement, e: unknown): void {
  const msg = e instanceof ApiError ? `${e.message} (${e.status})` : String(e);
  where.replaceChildren(h("p", { class: "error", role: "alert", text: msg }));
}

/** This node's name when it runs in a cluster (set at start), else null. */
let clusterNode: string | null = null;

// -- recent downs, kept from the live feed ------------------------------------

const recent: RegistryEvent[] = [];
live.on((e) => {
  recent.unshift(e);
  if (recent.length > 200) recent.length = 200;
});

// -- routing ------------------------------------------------------------------

let leave: (() => void) | null = null;

function navigate(to: string, replace = false): void {
  if (replace) history.replaceState(null, "", to);
  else history.pushState(null, "", to);
  route();
}

document.addEventListener("click", (ev) => {
  const a = (ev.target as HTMLElement).closest("a[data-link]") as HTMLAnchorElement | null;
  if (!a || ev.ctrlKey || ev.metaKey || ev.shiftKey || a.target) return;
  ev.preventDefault();
  navigate(a.getAttribute("href")!);
});
window.addEventListener("popstate", () => route());

function route(): void {
  leave?.();
  leave = null;
  const path = location.pathname;
  for (const a of document.querySelectorAll("nav a")) {
    const href = a.getAttribute("href")!;
    const here = href === "/" ? path === "/" : path.startsWith(href);
    if (here) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const m = path.match(/^\/instances\/([A-Za-z0-9-]+)$/);
  if (m) leave = detail(m[1]);
  else if (path === "/instances") leave = instances();
  else if (path === "/events") leave = events();
  else leave = overview();
  main.focus({ preventScroll: true });
}

// -- overview -----------------------------------------------------------------

interface Summary {
  total: number;
  byStatus: { up: number; down: number };
  distinctServices: number;
  byService: { serviceId: string; up: number }[];
  shards: { shard: number; connections: number }[];
  commandsInFlight: number;
  /** This node's name in a cluster; null when it runs alone. */
  node?: string | null;
}

function overview(): () => void {
  document.title = "tether: overview";
  const body = h("div", { class: "overview" }, h("p", { text: "Loading…" }));
  main.replaceChildren(h("h1", { text: "Overview" }), body);
  let timer = 0;
  let stopped = false;
  const load = async () => {
    try {
      const [s, c] = await Promise.all([get<Summary>("/summary?top=20"), clusterNode ? clusterStatus() : Promise.resolve(null)]);
      if (stopped) return;
      const card = (label: string, value: string | number, cls = "") =>
        h("div", { class: "card " + cls }, h("span", { class: "label", text: label }), h("span", { class: "value", text: String(value) }));
      const services = h(
        "table",
        {},
        h("caption", { text: `Services (top ${s.byService.length} of ${s.distinctServices})` }),
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Service" }), h("th", { scope: "col", text: "Up" }))),
        h(
          "tbody",
          {},
          ...s.byService.map((x) =>
            h("tr", {}, h("td", {}, link(`/instances?serviceId=${encodeURIComponent(x.serviceId)}`, x.serviceId)), h("td", { class: "num", text: String(x.up) })),
          ),
        ),
      );
      const shards = h(
        "table",
        {},
        h("caption", { text: "Connections per shard" }),
        h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Shard" }), h("th", { scope: "col", text: "Connections" }))),
        h("tbody", {}, ...s.shards.map((x) => h("tr", {}, h("td", { text: String(x.shard) }), h("td", { class: "num", text: String(x.connections) })))),
      );
      const downs = recent.filter((e) => e.kind === "down" || e.kind === "deregistered").slice(0, 20);
      const downList = h(
        "section",
        { "aria-label": "Recent downs" },
        h("h2", { text: "Recent downs and deregistrations" }),
        downs.length
          ? h("ul", { class: "downs" }, ...downs.map((e) => h("li", { class: e.kind }, h("time", { text: when(e.at) }), ` ${e.kind} `, link(`/instances/${e.runtimeInstanceId}`, e.serviceId), e.reason ? ` (${e.reason})` : "")))
          : h("p", { text: "None since this page opened." }),
      );
      body.replaceChildren(
        h(
          "div",
          { class: "cards" },
          card(c ? `Instances on ${c.node}` : "Instances", s.total),
          card("Up", s.byStatus.up, "up"),
          card("Down", s.byStatus.down, "down"),
          card("Services", s.distinctServices),
          card("Events/s", live.rate().toFixed(1)),
          card("Commands in flight", s.commandsInFlight),
          c ? card("Nodes", c.nodes.filter((n) => n.live).length) : null,
          c ? card("Up in the cluster", c.localInstances + c.remoteInstances, "up") : null,
        ),
        ...(c ? [clusterPanel(c)] : []),
        h("div", { class: "columns" }, services, shards),
        downList,
      );
    } catch (e) {
      if (!stopped) fail(body, e);
    }
  };
  void load();
  timer = window.setInterval(load, 3000);
  const offReset = live.onReset(() => void load());
  return () => {
    stopped = true;
    clearInterval(timer);
    offReset();
  };
}

/** The cluster's nodes as this node sees them; a warning when that is stale. */
function clusterPanel(c: ClusterStatus): HTMLElement {
  const nodes = h(
    "table",
    { "aria-label": "Nodes" },
    h("caption", { text: `Nodes of the cluster (this one: ${c.node})` }),
    h("thead", {}, h("tr", {}, h("th", { scope: "col", text: "Node" }), h("th", { scope: "col", text: "Up instances" }), h("th", { scope: "col", text: "State" }))),
    h(
      "tbody",
      {},
      ...c.nodes.map((n) =>
        h(
          "tr",
          { "data-node": n.node },
          h("td", { text: n.node }),
          h("td", { class: "num", text: String(n.self ? c.localInstances : n.instances) }),
          h("td", { class: n.live ? "status up" : "status down", text: n.self ? "this node" : n.live ? "live" : "gone" }),
        ),
      ),
    ),
  );
  const stale = c.stale
    ? h("p", { class: "stale error", role: "alert", text: `This node's view of the cluster is stale (etcd unreachable): ${c.lastError ?? "no detail"}. Its own instances are current.` })
    : null;
  return h("section", { "aria-label": "Cluster" }, stale, nodes);
}

// -- instances: server-side pages, a virtualized list -------------------------

interface Item {
  runtimeInstanceId: string;
  serviceId: string;
  status: string;
  address: string;
  port: number;
  version: string;
  envTag?: string;
  /** Absent for an instance another node holds. */
  shard?: number;
  connectedAt: string;
  /** Absent for an instance another node holds (that node sees its socket). */
  lastSeenAt?: string;
  /** The node that holds it (cluster listings). */
  node?: string;
  /** The last ping's round trip; null when none was measured. */
  rttMs: number | null;
}

function rtt(ms: number | null | undefined): string {
  return ms == null ? "—" : `${ms.toFixed(2)} ms`;
}

interface Page {
  total: number;
  items: Item[];
  nextCursor: string | null;
}

const ROW = 32;
const PAGE = 500;
const FILTERS = ["scope", "serviceId", "status", "envTag", "q", "sort"] as const;

/** The table's columns: their header and the server's sort key. */
const COLUMNS: [string, string][] = [
  ["Service", "serviceId"],
  ["Status", "status"],
  ["Address", "address"],
  ["Version", "version"],
  ["Env", "envTag"],
  ["Shard", "shard"],
  ["RTT", "rttMs"],
  ["Last seen", "lastSeenAt"],
];

function instances(): () => void {
  document.title = "tether: instances";
  const params = new URLSearchParams(location.search);
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter instances" });
  const input = (name: string, label: string, placeholder: string) =>
    h("label", {}, label + " ", h("input", { name, value: params.get(name) ?? "", placeholder, autocomplete: "off" }));
  const status = h("select", { name: "status" }, h("option", { value: "", text: "any" }), h("option", { value: "up", text: "up" }), h("option", { value: "down", text: "down" }));
  status.value = params.get("status") ?? "";
  // The order is sorted on the server; it lives in the URL with the filters.
  const sort = h("input", { type: "hidden", name: "sort", value: params.get("sort") ?? "" });
  // In a cluster the table lists every node's instances unless told to
  // list this node's; sorting orders one node's only.
  const scope = h("select", { name: "scope" }, h("option", { value: "cluster", text: "whole cluster" }), h("option", { value: "node", text: `this node (${clusterNode ?? ""})` }));
  scope.value = params.get("scope") === "node" ? "node" : "cluster";
  const clustered = () => clusterNode !== null && scope.value === "cluster";
  if (clustered()) sort.value = "";
  if (clusterNode) form.append(h("label", {}, "Scope ", scope));
  form.append(
    input("serviceId", "Service", "exact serviceId"),
    h("label", {}, "Status ", status),
    input("envTag", "Env", "envTag"),
    input("q", "Search", "id, address, version…"),
    sort,
  );
  const count = h("p", { class: "count", role: "status", "aria-live": "polite", text: "Loading…" });
  const nodeHeader = clusterNode ? h("span", { role: "columnheader", text: "Node" }) : null;
  const headers = COLUMNS.map(([label, key]) => {
    const button = h("button", { type: "button", class: "sort", text: label, title: `Sort by ${label.toLowerCase()}` });
    const cell = h("span", { role: "columnheader", "data-sort": key }, button);
    button.addEventListener("click", () => {
      // Ascending first; a second click turns it around.
      sort.value = sort.value === key ? "-" + key : key;
      showSort();
      onInput(0);
    });
    return cell;
  });
  const showSort = () => {
    for (const cell of headers) {
      const key = cell.dataset.sort;
      const dir = sort.value === key ? "ascending" : sort.value === "-" + key ? "descending" : "none";
      cell.setAttribute("aria-sort", dir);
      const button = cell.querySelector("button")!;
      button.disabled = clustered();
      button.title = clustered() ? "Sorting orders one node's instances: choose the scope 'this node'" : `Sort by ${button.textContent!.toLowerCase()}`;
    }
  };
  showSort();
  scope.addEventListener("change", () => {
    if (clustered()) sort.value = "";
    showSort();
  });
  const head = h("div", { class: "row head", role: "row" }, nodeHeader, ...headers);
  const spacer = h("div", { class: "spacer" });
  const viewport = h("div", { class: "viewport", role: "rowgroup", tabindex: "0", "aria-label": "Instances" }, spacer);
  const table = h("div", { class: clusterNode ? "vtable cluster" : "vtable", role: "table", "aria-label": "Instances" }, head, viewport);
  main.replaceChildren(h("h1", { text: "Instances" }), form, count, table);

  let rows: Item[] = [];
  let total = 0;
  let next: string | null = null;
  let loading = false;
  let generation = 0;
  let started = performance.now();

  const query = () => {
    const q = new URLSearchParams();
    for (const f of FILTERS) {
      const v = new URLSearchParams(location.search).get(f);
      if (v) q.set(f, v);
    }
    if (clustered()) {
      q.set("scope", "cluster");
      q.delete("sort");
    } else q.delete("scope");
    return q;
  };

  const render = () => {
    spacer.style.height = `${Math.max(total, rows.length) * ROW}px`;
    const first = Math.max(0, Math.floor(viewport.scrollTop / ROW) - 5);
    const last = Math.min(Math.max(total, rows.length), first + Math.ceil(viewport.clientHeight / ROW) + 10);
    const out: HTMLElement[] = [];
    for (let i = first; i < last; i++) {
      const r = rows[i];
      const row = r
        ? h(
            "div",
            { class: "row", role: "row", "data-id": r.runtimeInstanceId, "data-node": r.node ?? "" },
            clusterNode ? h("span", { role: "cell", class: "node", text: r.node ?? clusterNode }) : null,
            h("span", { role: "cell" }, link(`/instances/${r.runtimeInstanceId}`, r.serviceId)),
            h("span", { role: "cell", class: "status " + r.status, text: r.status }),
            h("span", { role: "cell", text: `${r.address}:${r.port}` }),
            h("span", { role: "cell", text: r.version }),
            h("span", { role: "cell", text: r.envTag ?? "" }),
            h("span", { role: "cell", class: "num", text: r.shard == null ? "—" : String(r.shard) }),
            h("span", { role: "cell", class: "num", text: rtt(r.rttMs) }),
            h("span", { role: "cell", text: when(r.lastSeenAt) }),
          )
        : h("div", { class: "row pending", role: "row" }, h("span", { role: "cell", text: "…" }));
      row.style.transform = `translateY(${i * ROW}px)`;
      out.push(row);
    }
    spacer.replaceChildren(...out);
    if (last > rows.length - 50 && next !== null) void more();
  };

  const more = async () => {
    if (loading || (next === null && rows.length > 0)) return;
    loading = true;
    const gen = generation;
    try {
      const q = query();
      q.set("limit", String(PAGE));
      if (next) q.set("cursor", next);
      const page = await get<Page>("/services?" + q.toString());
      if (gen !== generation) return;
      rows = rows.concat(page.items);
      total = page.total;
      next = page.nextCursor;
      count.textContent = `${total.toLocaleString()} instances${next ? ` (${rows.length.toLocaleString()} loaded)` : ""}`;
      if (rows.length === page.items.length) {
        // The first page of this view: how long it took, for the load test.
        const ms = performance.now() - started;
        performance.mark("tether:first-page", { detail: { ms, total } });
        table.setAttribute("data-loaded", String(generation));
      }
    } catch (e) {
      if (gen === generation) fail(count, e);
    } finally {
      loading = false;
    }
    if (gen === generation) render();
  };

  const reload = () => {
    generation++;
    rows = [];
    total = 0;
    next = null;
    loading = false;
    started = performance.now();
    table.removeAttribute("data-loaded");
    viewport.scrollTop = 0;
    count.textContent = "Loading…";
    render();
    void more();
  };

  let debounce = 0;
  const onInput = (wait = 250) => {
    clearTimeout(debounce);
    debounce = window.setTimeout(() => {
      const q = new URLSearchParams();
      for (const [k, v] of new FormData(form)) if (typeof v === "string" && v) q.set(k, v);
      const s = q.toString();
      history.replaceState(null, "", "/instances" + (s ? "?" + s : ""));
      reload();
    }, wait);
  };
  form.addEventListener("input", () => onInput());
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    onInput();
  });
  viewport.addEventListener("scroll", () => requestAnimationFrame(render));
  viewport.addEventListener("keydown", (ev) => {
    const step = { ArrowDown: ROW, ArrowUp: -ROW, PageDown: viewport.clientHeight, PageUp: -viewport.clientHeight }[ev.key];
    if (step) {
      viewport.scrollTop += step;
      ev.preventDefault();
    }
  });
  // Live: a row whose instance changed is updated in place.
  const off = live.on((e) => {
    const i = rows.findIndex((r) => r.runtimeInstanceId === e.runtimeInstanceId);
    if (i >= 0 && (e.kind === "down" || e.kind === "deregistered" || e.kind === "superseded")) {
      rows[i] = { ...rows[i], status: e.kind === "down" ? "down" : "gone" };
      render();
    } else if (i >= 0 && (e.kind === "registered" || e.kind === "updated")) {
      rows[i] = { ...rows[i], status: "up" };
      render();
    }
  });
  const offReset = live.onReset(reload);
  reload();
  return () => {
    generation++;
    off();
    offReset();
  };
}

// -- instance detail ----------------------------------------------------------

interface Tool {
  name: string;
  description?: string;
  inputSchema?: { properties?: Record<string, { type?: string; description?: string }> };
}

interface CommandAnswer {
  outcome: string;
  result?: unknown;
  error?: unknown;
  message?: string;
}

const MUTATING = /^(set_.*|reload_modules|clear_cache|configure_chaos_monkey|shutdown)$/i;

const confirmDialog = document.getElementById("confirm") as HTMLDialogElement;

function confirmSend(text: string): Promise<boolean> {
  (document.getElementById("confirm-text") as HTMLElement).textContent = text;
  confirmDialog.returnValue = "";
  confirmDialog.showModal();
  return new Promise((resolve) => {
    confirmDialog.addEventListener("close", () => resolve(confirmDialog.returnValue === "ok"), { once: true });
  });
}

function detail(id: string): () => void {
  document.title = "tether: instance";
  const meta = h("section", { "aria-label": "Instance" }, h("p", { text: "Loading…" }));
  const tools = h("section", { "aria-label": "Tools" }, h("h2", { text: "Tools" }), h("p", { text: "Loading…" }));
  const feed = h("ul", { class: "feed" });
  main.replaceChildren(
    h("p", {}, link("/instances", "← Instances")),
    h("h1", { text: "Instance" }),
    meta,
    tools,
    h("section", { "aria-label": "Recent events" }, h("h2", { text: "Recent events" }), feed),
  );
  const showEvent = (e: RegistryEvent) =>
    feed.prepend(h("li", {}, h("time", { text: when(e.at) }), ` ${e.kind} `, e.reason ?? ""));
  recent.filter((e) => e.runtimeInstanceId === id).reverse().forEach(showEvent);
  let serviceId = "";

  const loadMeta = async () => {
    try {
      const n = await get<Item & Record<string, unknown>>(`/services/${id}`);
      serviceId = n.serviceId;
      document.title = `tether: ${n.serviceId}`;
      const dl = h("dl", { class: "meta" });
      const row = (k: string, v: string, cls = "") => dl.append(h("dt", { text: k }), h("dd", { class: cls, text: v }));
      const holder = n.node ?? clusterNode;
      if (holder) row("Node", holder + (holder === clusterNode ? " (this one)" : " (commands go to it through this one)"));
      row("Service", n.serviceId);
      row("Status", n.status, "status " + n.status);
      row("Instance", n.runtimeInstanceId);
      row("Address", `${n.address}:${n.port}`);
      row("Version", n.version);
      row("Env", n.envTag ?? "");
      row("Protocol", String(n["protocol"] ?? ""));
      row("Shard", n.shard == null ? "— (on another node)" : String(n.shard));
      row("Connected", when(n.connectedAt));
      row("Last seen", n.lastSeenAt ? when(n.lastSeenAt) : "— (its node sees its socket; up there)");
      if (n.node === clusterNode || !n.node) row("RTT", n.rttMs == null ? "— (not measured yet, or it shows life on its own and is not pinged)" : `${rtt(n.rttMs)} (last ping)`);
      meta.replaceChildren(dl);
    } catch (e) {
      fail(meta, e);
    }
  };

  const loadTools = async () => {
    try {
      const a = await get<CommandAnswer>(`/services/${id}/tools`);
      const list = ((a.result as { tools?: Tool[] } | undefined)?.tools ?? []) as Tool[];
      const out = h("div", { class: "tools" });
      for (const t of list) out.append(toolForm(t));
      tools.replaceChildren(h("h2", { text: "Tools" }), list.length ? out : h("p", { text: `No tools (${a.outcome}).` }));
    } catch (e) {
      tools.replaceChildren(h("h2", { text: "Tools" }));
      const p = h("p");
      tools.append(p);
      fail(p, e);
    }
  };

  const toolForm = (t: Tool): HTMLElement => {
    const mutating = MUTATING.test(t.name);
    const allowed = !mutating || !!session?.canWrite;
    const form = h("form", { class: "tool", "data-tool": t.name });
    const fields = Object.entries(t.inputSchema?.properties ?? {});
    for (const [name, p] of fields) {
      form.append(h("label", {}, `${name} `, h("input", { name, placeholder: p.type ?? "", title: p.description ?? "" })));
    }
    const result = h("pre", { class: "result", role: "status", "aria-live": "polite" });
    const send = h("button", { type: "submit", text: `Send ${t.name}` });
    const fan = h("button", { type: "button", class: "secondary", text: "…to every instance of the service" });
    if (!allowed) {
      send.disabled = true;
      fan.disabled = true;
      send.title = fan.title = "needs the portal.w scope";
    }
    const args = () => {
      const a: Record<string, unknown> = {};
      for (const [k, v] of new FormData(form)) {
        if (typeof v !== "string" || v === "") continue;
        try {
          a[k] = JSON.parse(v);
        } catch {
          a[k] = v;
        }
      }
      return a;
    };
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      if (mutating && !(await confirmSend(`Send ${t.name} to this instance?`))) return;
      result.textContent = "Sending…";
      try {
        const a = await post<CommandAnswer>(`/services/${id}/commands`, { name: t.name, arguments: args() });
        result.textContent = `${a.outcome}\n` + JSON.stringify(a.result ?? a.error ?? a, null, 2);
        result.dataset.outcome = a.outcome;
      } catch (e) {
        result.textContent = e instanceof Error ? e.message : String(e);
        result.dataset.outcome = "error";
      }
    });
    fan.addEventListener("click", async () => {
      if (!(await confirmSend(`Send ${t.name} to every instance of ${serviceId}?`))) return;
      result.textContent = "Sending to all…";
      try {
        const a = await post<{ results?: { runtimeInstanceId: string; outcome: string }[]; [k: string]: unknown }>("/commands", {
          name: t.name,
          serviceId,
          arguments: args(),
        });
        const lines = (a.results ?? []).map((r) => `${r.runtimeInstanceId}: ${r.outcome}`);
        result.textContent = lines.length ? lines.join("\n") : JSON.stringify(a, null, 2);
      } catch (e) {
        result.textContent = e instanceof Error ? e.message : String(e);
      }
    });
    form.append(h("div", { class: "actions" }, send, fan), result);
    return h("article", {}, h("h3", { text: t.name + (mutating ? " (changes the service)" : "") }), h("p", { text: t.description ?? "" }), form);
  };

  const off = live.on((e) => {
    if (e.runtimeInstanceId !== id) return;
    showEvent(e);
    void loadMeta();
  });
  void loadMeta();
  void loadTools();
  return off;
}

// -- live event feed ----------------------------------------------------------

function events(): () => void {
  document.title = "tether: events";
  const list = h("ol", { class: "feed", reversed: "" });
  const add = (e: RegistryEvent) => {
    list.prepend(
      h(
        "li",
        { class: e.kind },
        h("time", { text: when(e.at) }),
        ` #${e.seq} ${e.node ? `${e.node} ` : ""}${e.kind} `,
        link(`/instances/${e.runtimeInstanceId}`, e.serviceId),
        e.reason ? ` (${e.reason})` : "",
      ),
    );
    while (list.children.length > 500) list.lastElementChild!.remove();
  };
  recent.slice().reverse().forEach(add);
  const whose = clusterNode ? ", on every node of the cluster" : "";
  main.replaceChildren(h("h1", { text: "Events" }), h("p", { text: `Live: registrations, downs and the rest${whose}, newest first.` }), list);
  return live.on(add);
}

// -- start --------------------------------------------------------------------

async function start(): Promise<void> {
  const s = await loadSession();
  // Asked of the summary, which every controller answers (GET /cluster is
  // a 404 where it runs alone).
  clusterNode = (await get<Summary>("/summary?top=0")).node ?? null;
  const who = document.getElementById("who") as HTMLElement;
  who.textContent = `${s.user}${s.canWrite ? "" : " (read only)"}`;
  const out = document.getElementById("logout") as HTMLButtonElement;
  out.hidden = false;
  out.addEventListener("click", () => void logout());
  const badge = document.getElementById("live") as HTMLElement;
  live.onState = (up) => {
    const nodes = [...live.nodes].sort();
    badge.textContent = !up ? "reconnecting…" : nodes.length ? `live: ${nodes.join(", ")}` : "live";
    badge.dataset.state = up ? "up" : "down";
    badge.dataset.nodes = nodes.join(" ");
  };
  // In a cluster the live feed is every node's (the merged stream).
  live.cluster = clusterNode !== null;
  live.connect();
  route();
}

start().catch((e) => {
  // A redirect to the login is on its way; anything else is shown.
  if (!(e instanceof ApiError && e.status === 401)) fail(main, e);
});
