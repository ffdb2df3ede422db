// UI speed, measured in the browser with the Performance API: the time to
// the instance table's first page (from navigation start, and from the
// request being made to its rows drawn), and to a filtered page (from the
// keystroke, the UI's 250 ms debounce included, and from the request), and
// to a page sorted on the server (from the click on the column header).
//   node e2e/perf.mjs <gateway URL> <runs> <serviceId to filter by> <q to search>
// Prints one JSON line per measurement, then {"done": true}.
import { chromium } from "playwright-core";

const [base, runsArg, serviceId, q] = process.argv.slice(2);
const runs = Number(runsArg ?? 5);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
const emit = (v) => console.log(JSON.stringify(v));

// The newest first-page mark: [time since navigation start, fetch+render ms].
const lastMark = () =>
  page.evaluate(() => {
    const m = performance.getEntriesByName("tether:first-page").pop();
    return m ? { at: m.startTime, ms: m.detail.ms, total: m.detail.total, n: performance.getEntriesByName("tether:first-page").length } : null;
  });

try {
  await page.goto(base + "/auth/login?return_to=%2Finstances");
  await page.fill("input[name=user]", "perf");
  await page.click("button[type=submit]");
  await page.waitForSelector(".vtable[data-loaded]", { timeout: 120000 });
  for (let r = 0; r < runs; r++) {
    await page.goto(base + "/instances", { waitUntil: "commit" });
    await page.waitForSelector(".vtable[data-loaded]", { timeout: 120000 });
    const m = await lastMark();
    emit({ kind: "first page", fromNavigationMs: m.at, requestToRowsMs: m.ms, total: m.total });
    for (const [name, value, kind] of [["serviceId", serviceId, "filtered by serviceId"], ["q", q, "substring search (q)"]]) {
      const before = (await lastMark()).n;
      const t0 = await page.evaluate(([name, value]) => {
        const input = document.querySelector(`input[name=${name}]`);
        input.value = value;
        const t = performance.now();
        input.dispatchEvent(new Event("input", { bubbles: true }));
        return t;
      }, [name, value]);
      await page.waitForFunction((n) => performance.getEntriesByName("tether:first-page").length > n, before, { timeout: 120000 });
      const f = await lastMark();
      emit({ kind, fromKeystrokeMs: f.at - t0, requestToRowsMs: f.ms, total: f.total });
      // Clear it again for the next filter.
      await page.evaluate((name) => {
        const input = document.querySelector(`input[name=${name}]`);
        input.value = "";
        input.dispatchEvent(new Event("input", { bubbles: true }));
      }, name);
      await page.waitForFunction((n) => performance.getEntriesByName("tether:first-page").length > n + 1, before, { timeout: 120000 });
    }
    const before = (await lastMark()).n;
    const t0 = await page.evaluate(() => {
      const t = performance.now();
      document.querySelector("[data-sort=serviceId] button").click();
      return t;
    });
    await page.waitForFunction((n) => performance.getEntriesByName("tether:first-page").length > n, before, { timeout: 120000 });
    const f = await lastMark();
    emit({ kind: "sorted by serviceId", fromKeystrokeMs: f.at - t0, requestToRowsMs: f.ms, total: f.total });
  }
  emit({ done: true });
} catch (e) {
  emit({ failed: String(e) });
  process.exitCode = 1;
} finally {
  await browser.close();
}
