// Drives the dashboard in real headless Chromium (Debian's /usr/bin/chromium through
// playwright-core; never `playwright install`). Started by ../dashboard.rs, which has made a
// daemon with a token and a finished run with metrics and a failing instance. Prints `READY`
// once the task list is checked, then waits for a new task to appear without a reload (the
// Rust test starts one when it reads READY). Any failed check exits non-zero with a message.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const base = process.env.TG_URL;
const token = process.env.TG_TOKEN;
const task = process.env.TG_TASK;
const expectPoints = Number(process.env.TG_EXPECT_POINTS);
const shots = process.env.TG_SCREENSHOT_DIR;
mkdirSync(shots, { recursive: true });

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`ok: ${what}`);
}

// The page and its API need the token.
for (const path of ["/", "/api/v1/tasks", `/api/v1/tasks/${task}`]) {
  const r = await fetch(base + path);
  check(r.status === 403, `${path} without a token is refused (${r.status})`);
}

const browser = await chromium.launch({
  executablePath: process.env.TG_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => { console.log(`page error: ${e}`); failed = true; });
  // Nothing but the daemon: the page must work offline.
  await page.route("**/*", (route) => {
    const u = new URL(route.request().url());
    if (u.origin === new URL(base).origin) return route.continue();
    console.log(`blocked outside request: ${u}`);
    failed = true;
    return route.abort();
  });

  await page.goto(`${base}/?token=${encodeURIComponent(token)}`);
  const row = page.locator(`tr[data-id="${task}"]`);
  await row.waitFor({ timeout: 15000 });
  check((await row.locator("td.outcome").innerText()).includes("failure"), "the task is listed with outcome failure");
  const groups = await row.locator("td.groups").innerText();
  check(groups.includes("bad 0/1") && groups.includes("good 2/2"), `group outcomes shown: ${groups}`);
  await page.locator("#live.on").waitFor({ timeout: 10000 });
  await page.screenshot({ path: join(shots, "dashboard-tasks.png"), fullPage: true });
  const before = await page.locator("#tasks tr").count();
  console.log("READY");

  // A new task appears without a reload.
  await page.waitForFunction((n) => document.querySelectorAll("#tasks tr").length > n, before, { timeout: 60000 });
  check(true, "a new task appeared in the list without a reload");

  await row.click();
  await page.locator("#outcome").waitFor();
  check((await page.locator("#outcome").innerText()).includes("failure"), "the run page shows the outcome");
  await page.waitForFunction(() => document.getElementById("tasklog")?.textContent.includes("run finished with outcome = failure"), null, { timeout: 15000 });
  check(true, "the task log is shown as text");
  const bad = page.locator('tr[data-instance="bad[000]"]');
  await bad.waitFor();
  check((await bad.getAttribute("data-state")) === "fail", "the failing instance's state is fail");
  check((await bad.innerText()).includes("exited with status 1"), "the failing instance's exit is shown");
  check((await page.locator("tr[data-instance]").count()) === 3, "three instances listed");
  await bad.click();
  await page.waitForFunction(() => (document.getElementById("run-out") || {}).textContent?.includes("failing on purpose"), null, { timeout: 15000 });
  check(true, "the failing instance's run.out is shown");

  const chart = page.locator("#chart-instances[data-points]");
  await chart.waitFor({ timeout: 15000 });
  const points = Number(await chart.getAttribute("data-points"));
  check(points === expectPoints, `the metric plot has ${points} points (expected ${expectPoints})`);
  check((await page.locator("#chart-instances canvas").count()) === 1, "the plot is drawn");
  check(!(await page.locator("main").innerText()).includes("null"), "no placeholder printed as text");
  await page.screenshot({ path: join(shots, "dashboard-run.png"), fullPage: true });

  // The plan's history across runs.
  await page.goto(`${base}/#/plan/example-python/metrics`);
  const hist = page.locator("#chart-history[data-points]");
  await hist.waitFor({ timeout: 15000 });
  check(Number(await hist.getAttribute("data-points")) >= 1, "the metric across runs is plotted");
  await page.screenshot({ path: join(shots, "dashboard-history.png"), fullPage: true });
} finally {
  await browser.close();
}
if (failed) {
  console.log("FAILED: page errors or requests outside the daemon");
  process.exit(1);
}
console.log("DONE");
