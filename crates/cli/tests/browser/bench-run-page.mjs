// Benchmark (not a test): how long the dashboard's run page takes to show a large run in
// headless Chromium. Prints first contentful paint, the instances table complete, and the
// metric plot drawn, each in ms from navigation start. Used by bench/dashboard.sh.
import { chromium } from "playwright-core";

const [base, token, task, instances] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.TG_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await ctx.newPage();
  await page.goto(`${base}/?token=${encodeURIComponent(token)}`);
  await page.locator("#tasks tr").first().waitFor();
  for (let round = 0; round < 3; round++) {
    await page.goto("about:blank");
    const t0 = Date.now();
    await page.goto(`${base}/#/task/${task}`);
    await page.waitForFunction((n) => document.querySelectorAll("tr[data-instance]").length >= n, Number(instances), { timeout: 120000 });
    const table = Date.now() - t0;
    await page.locator("#chart-instances[data-points] canvas").waitFor({ timeout: 120000 });
    const chart = Date.now() - t0;
    const fcp = await page.evaluate(() => {
      const e = performance.getEntriesByName("first-contentful-paint")[0];
      return e ? Math.round(e.startTime) : -1;
    });
    const points = await page.locator("#chart-instances").getAttribute("data-points");
    console.log(`round ${round + 1}: first contentful paint ${fcp} ms, ${instances} instance rows ${table} ms, metric plot (${points} points drawn of the first 50 instances) ${chart} ms`);
  }
} finally {
  await browser.close();
}
