// The Admin UI in front of a cluster of two controller nodes on etcd.
// Run by tests/cluster.rs, which starts etcd, nodes a and b, the gateway
// (dev login) in front of a, and swarms on both, and passes:
//   node e2e/cluster.mjs <gateway URL> <artifact dir> <on a> <on b>
// Through a alone the page lists both nodes' instances, each with its
// node, opens one that b holds and runs a tool on it (a forwards it), and
// the overview shows both nodes. `REGISTER on b` asks the test to register
// a service "zeta" on b, which the live feed must show.
import { login, open, run, sendTool, step, tableCount } from "./common.mjs";

const [base, out, onA, onB] = process.argv.slice(2);
const all = Number(onA) + Number(onB);
const session = await open(out);
const { page, problems, shot } = session;

await run(session, async () => {
  await login(page, base, "/instances", "e2e-admin");
  step("logged in", { url: page.url() });
  problems.length = 0;

  // The whole cluster by default: a's and b's, each row naming its node;
  // sorting (one node's order) is off.
  const whole = await tableCount(page);
  step("cluster table", whole);
  if (whole.total !== all) throw new Error(`the table says ${whole.count}, not ${all} instances`);
  if (!(await page.isDisabled("[data-sort=serviceId] button"))) throw new Error("sorting is offered across nodes");
  await page.fill("input[name=serviceId]", "beta");
  await page.waitForURL(/serviceId=beta/);
  const beta = await tableCount(page);
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll(".viewport .row[data-id]")];
    return rows.length > 0 && rows.every((r) => r.querySelector(".node")?.textContent === "b");
  });
  step("b's instances", beta);
  if (beta.total !== Number(onB)) throw new Error(`beta: ${beta.count}, not ${onB}`);
  await shot("11-cluster-instances");

  // This node's only: b's are gone from the table.
  await page.selectOption("select[name=scope]", "node");
  await page.waitForURL(/scope=node/);
  const mine = await tableCount(page);
  step("this node's", mine);
  if (mine.total !== 0) throw new Error(`a holds no beta, yet the table says ${mine.count}`);
  await page.fill("input[name=serviceId]", "");
  await page.waitForURL((u) => !u.search.includes("serviceId"));
  const ownAll = await tableCount(page);
  if (ownAll.total !== Number(onA)) throw new Error(`a's own: ${ownAll.count}, not ${onA}`);
  if (await page.isDisabled("[data-sort=serviceId] button")) throw new Error("sorting is off for one node");

  // One of b's, opened through a: its node, and a tool a forwards to b.
  await page.goto(base + "/instances?scope=cluster&serviceId=beta");
  await tableCount(page);
  await page.locator(".viewport .row[data-id] a").first().click();
  await page.waitForURL(/\/instances\/[0-9a-f-]+$/);
  await page.waitForSelector("dl.meta");
  const node = await page.$$eval("dl.meta dt", (dts) => dts.find((dt) => dt.textContent === "Node")?.nextElementSibling?.textContent);
  step("remote detail", { node });
  if (!node?.startsWith("b ")) throw new Error("the detail does not name node b: " + node);
  await page.waitForSelector("form[data-tool=get_service_info]");
  const reply = await sendTool(page, "get_service_info");
  step("forwarded tool", { reply: reply?.slice(0, 200) });
  if (!reply?.includes('"serviceId": "beta"')) throw new Error("the reply does not name beta: " + reply);
  await shot("12-remote-detail");

  // The overview: both nodes, and what the cluster holds.
  await page.click("nav a[href='/']");
  await page.waitForSelector("table[aria-label=Nodes] tr[data-node=b]");
  const nodes = await page.$$eval("table[aria-label=Nodes] tbody tr", (rows) => rows.map((r) => r.getAttribute("data-node")));
  const cards = await page.$$eval(".cards .card", (cs) => Object.fromEntries(cs.map((c) => [c.querySelector(".label")?.textContent, c.querySelector(".value")?.textContent])));
  step("cluster overview", { nodes, cards });
  if (cards["Nodes"] !== "2") throw new Error("the overview does not count 2 nodes: " + JSON.stringify(cards));
  if (cards["Up in the cluster"] !== String(all)) throw new Error("the overview's cluster count: " + JSON.stringify(cards));
  await shot("13-cluster-overview");

  // The live feed is every node's: a service that registers on b shows on
  // a's page, named with its node.
  await page.click("nav a[href='/events']");
  await page.waitForFunction(() => document.querySelector("#live")?.getAttribute("data-nodes") === "a b");
  console.log("REGISTER on b");
  await page.waitForFunction(
    () => [...document.querySelectorAll(".feed li")].some((li) => /b registered zeta/.test(li.textContent ?? "")),
    null,
    { timeout: 15000 },
  );
  const badge = await page.textContent("#live");
  step("b's event live", { badge });
  await shot("14-cluster-events");
});
