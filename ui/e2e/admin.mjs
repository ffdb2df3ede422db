// The Admin UI in headless Debian Chromium, driven by playwright-core.
// Run by tests/browser.rs, which starts the controller, the gateway (--dev
// login) and the swarms, and passes:
//   node e2e/admin.mjs <gateway URL> <artifact dir> <expected services>
// It prints one JSON line per step; `STOP canary` asks the test to stop the
// canary's swarm, after which the page must show it down, live.
import { login, open, run, sendTool, step, tableCount } from "./common.mjs";

const [base, out, expected] = process.argv.slice(2);
const session = await open(out);
const { page, problems, shot } = session;

await run(session, async () => {
  // Not logged in: the UI sends the browser to the login page.
  await login(page, base, "/instances", "e2e-admin", () => shot("01-login"));
  step("logged in", { url: page.url() });
  // What the login page and the redirect to it logged is expected.
  problems.length = 0;

  // The table: every swarm service, paged from the server.
  const { count, total } = await tableCount(page);
  const firstPage = await page.evaluate(() => performance.getEntriesByName("tether:first-page").pop()?.detail);
  step("table", { count, total, firstPageMs: firstPage?.ms });
  if (total !== Number(expected)) throw new Error(`the table says ${count}, not ${expected} instances`);
  await shot("02-instances");

  // Sort by service on the server, from the column header: ascending puts
  // the canary first, a second press (from the keyboard) turns it around.
  const firstService = () => page.textContent(".viewport .row[data-id] span:first-child");
  await page.click("[data-sort=serviceId] button");
  await page.waitForURL(/sort=serviceId/);
  await page.waitForFunction(() => document.querySelector("[data-sort=serviceId]")?.getAttribute("aria-sort") === "ascending" && document.querySelector(".vtable[data-loaded]"));
  const ascending = await firstService();
  await page.focus("[data-sort=serviceId] button");
  await page.keyboard.press("Enter");
  await page.waitForURL(/sort=-serviceId/);
  await page.waitForFunction(() => document.querySelector(".vtable[data-loaded]") && document.querySelector(".viewport .row[data-id] span")?.textContent?.startsWith("svc-9"));
  const descending = await firstService();
  step("sorted", { ascending, descending, url: page.url() });
  if (ascending !== "canary") throw new Error(`sorted by service, the first row is ${ascending}, not canary`);
  await shot("02-sorted");

  // Filter by service: the URL carries it, the server pages it.
  await page.fill("input[name=serviceId]", "svc-3");
  await page.waitForURL(/serviceId=svc-3/);
  await page.waitForFunction(() => /^\d[\d,]* instances/.test(document.querySelector(".count")?.textContent ?? "") && document.querySelector(".vtable[data-loaded]"));
  await page.waitForFunction(() => [...document.querySelectorAll(".viewport .row[data-id]")].every((r) => r.textContent?.startsWith("svc-3")));
  const filtered = await page.textContent(".count");
  step("filtered", { count: filtered, url: page.url() });
  await shot("03-filtered");

  // Open one, with the keyboard: focus its link and press Enter.
  const first = page.locator(".viewport .row[data-id] a").first();
  await first.focus();
  await page.keyboard.press("Enter");
  await page.waitForURL(/\/instances\/[0-9a-f-]+$/);
  await page.waitForSelector("dl.meta");
  // The last ping's round trip (the test pings every second).
  const rtt = await page.$$eval("dl.meta dt", (dts) => dts.find((dt) => dt.textContent === "RTT")?.nextElementSibling?.textContent);
  step("detail", { url: page.url(), rtt });
  if (!/ms \(last ping\)$/.test(rtt ?? "")) throw new Error("the detail shows no round trip: " + rtt);

  // Its tools, from tools/list; get_service_info sent, and its reply.
  await page.waitForSelector("form[data-tool=get_service_info]");
  const tools = await page.$$eval("form[data-tool]", (fs) => fs.map((f) => f.getAttribute("data-tool")));
  step("tools", { tools });
  const reply = await sendTool(page, "get_service_info");
  step("get_service_info", { reply: reply?.slice(0, 200) });
  if (!reply?.includes('"serviceId": "svc-3"')) throw new Error("the reply does not name the service: " + reply);
  await shot("04-detail");

  // A service goes down, live: the canary's swarm is stopped.
  await page.goto(base + "/instances?serviceId=canary");
  await page.waitForSelector(".viewport .row[data-id] .status.up");
  await page.waitForFunction(() => document.querySelector("#live")?.getAttribute("data-state") === "up");
  console.log("STOP canary");
  await page.waitForSelector(".viewport .row[data-id] .status.gone, .viewport .row[data-id] .status.down", { timeout: 30000 });
  step("down live", { status: await page.textContent(".viewport .row[data-id] .status") });
  await shot("05-down-live");
  // The overview (reached inside the app, so the live feed stays) counts
  // what is left and lists the canary among the recent downs.
  await page.click("nav a[href='/']");
  await page.waitForFunction(() => document.querySelector(".cards .card .value")?.textContent === "1000");
  await page.waitForSelector(".downs li");
  const downs = await page.textContent(".downs");
  if (!downs?.includes("canary")) throw new Error("the overview's recent downs miss the canary: " + downs);
  await shot("06-overview");
  await page.emulateMedia({ colorScheme: "dark" });
  await shot("07-overview-dark");
  step("overview", { instances: await page.textContent(".cards .card .value"), downs });
});
