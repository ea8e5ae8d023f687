import { chromium } from 'playwright-core';
import { serve } from '/work/main/web/scripts/server.mjs';
const server = await serve({});
const origin = `http://127.0.0.1:${server.address().port}`;
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader', '--no-sandbox','--disable-background-networking','--disable-component-update','--disable-sync','--disable-quic'] });
const page = await browser.newPage();
const msgs = [];
page.on('console', (m) => msgs.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => msgs.push(`pageerror: ${e}`));
page.on('worker', (w) => msgs.push('worker started ' + w.url()));
await page.goto(`${origin}/web/test/harness.html`);
await page.waitForFunction(() => window.harnessReady === true);
page.setDefaultTimeout(300000);
const call = (fn, ...args) => page.evaluate(([f, a]) => window.harness[f](...a), [fn, args]);
try {
  console.log(JSON.stringify(await call('load', 'sd1')));
  const r = await call('sdCase', 'sd1', { scheduler: 'pndm', gate: false, key: 'pipe.pndm.full' });
  console.log(JSON.stringify({ err: r.err, scale: r.scale, ms: r.timings.map((t) => Math.round(t.ms)) }));
} catch (e) { console.log('ERR', String(e).slice(0, 800)); }
for (const m of msgs.slice(0, 40)) console.log(m.slice(0, 3000));
await browser.close(); server.close();
