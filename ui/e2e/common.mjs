// What every browser script shares: headless Debian Chromium through
// playwright-core, one JSON line per step on stdout, screenshots, the page's
// errors collected, and the gateway's dev login.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

export const step = (name, detail = {}) => console.log(JSON.stringify({ step: name, ...detail }));

/** A browser and a page; `shot(name)` saves a screenshot into `out`. */
export async function open(out) {
  mkdirSync(out, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(String(e)));
  page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
  const shot = (name) => page.screenshot({ path: `${out}/${name}.png`, fullPage: false });
  return { browser, page, problems, shot };
}

/** Not logged in, `path` sends the browser to the dev login; it logs in
 * as `user` and comes back to `path`. */
export async function login(page, base, path, user, shot) {
  await page.goto(base + path);
  await page.waitForURL(/\/auth\/login/);
  await page.fill("input[name=user]", user);
  if (shot) await shot();
  await page.click("button[type=submit]");
  await page.waitForURL(new RegExp(path.replace(/[?]/g, "\\?") + "$"));
}

/** The number the instance table's count line starts with, once loaded. */
export async function tableCount(page) {
  await page.waitForFunction(
    () => document.querySelector(".vtable[data-loaded]") && /^\d[\d,]* instances/.test(document.querySelector(".count")?.textContent ?? ""),
  );
  const count = await page.textContent(".count");
  return { count, total: Number((count ?? "").replace(/,/g, "").match(/^\d+/)?.[0]) };
}

/** Sends the tool `name` from an instance's page; its reply once "ok". */
export async function sendTool(page, name) {
  const form = `form[data-tool=${name}]`;
  await page.click(`${form} button[type=submit]`);
  await page.waitForFunction((f) => document.querySelector(`${f} .result`)?.getAttribute("data-outcome") === "ok", form);
  return page.textContent(`${form} .result`);
}

/** Runs `body`; on a failure saves a screenshot and prints a failed step. */
export async function run({ browser, problems, shot }, body) {
  try {
    await body();
    if (problems.length) throw new Error("page errors: " + problems.join("; "));
    step("done");
  } catch (e) {
    await shot("failure").catch(() => {});
    console.log(JSON.stringify({ step: "failed", error: String(e), problems }));
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}
