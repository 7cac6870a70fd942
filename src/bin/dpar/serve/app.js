// dpar serve: the page. No build step, no libraries: it talks to /api/* and draws on canvases.
'use strict';

const $ = (id) => document.getElementById(id);
const OUTLINE = '#ff2d95';
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
let info = null;
// Timings measured in the page (click → first code, click → image) mean nothing under a
// headless browser's virtual clock, so the autostarted page shows the server's only.
const AUTOSTART = new URLSearchParams(location.search).has('autostart');
let streams = [];
let panels = [];

function viridis(t) {
  t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i;
  const c = VIRIDIS[i].map((v, j) => Math.round(v + f * (VIRIDIS[i + 1][j] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function say(text) { $('message').textContent = text || ''; }

function mode() { return document.querySelector('input[name=mode]:checked').value; }

// The query of one generation from the controls.
function params(model) {
  const p = new URLSearchParams();
  p.set('model', model);
  for (const id of ['class', 'seed', 'cfg', 'temperature', 'top_k', 'top_p', 'pace']) p.set(id, $(id).value);
  if (model === 'dpar') {
    p.set('theta', $('theta').value);
    p.set('patcher', $('entropy_from').value);
    p.set('max_patch_len', $('max_patch_len').value);
    for (const id of ['entropy_gate', 'max_len', 'row_reset', 'static']) p.set(id, $(id).checked ? '1' : '0');
  }
  return p;
}

// Patch ids of the codes from patch lengths.
function idsFromLengths(lengths) {
  const ids = [];
  lengths.forEach((len, p) => { for (let i = 0; i < len; i++) ids.push(p); });
  return ids;
}

// Outlines each patch of `ids` (codes 0..upto) on a canvas of a g × g grid.
function outline(ctx, ids, upto, g, size, colour, width) {
  const cell = size / g;
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.beginPath();
  for (let k = 0; k <= upto; k++) {
    const r = Math.floor(k / g), c = k % g, x = c * cell, y = r * cell, p = ids[k];
    const same = (j) => j >= 0 && j <= upto && ids[j] === p;
    if (c === 0 || !same(k - 1)) { ctx.moveTo(x, y); ctx.lineTo(x, y + cell); }
    if (c === g - 1 || !same(k + 1)) { ctx.moveTo(x + cell, y); ctx.lineTo(x + cell, y + cell); }
    if (r === 0 || !same(k - g)) { ctx.moveTo(x, y); ctx.lineTo(x + cell, y); }
    if (r === g - 1 || !same(k + g)) { ctx.moveTo(x, y + cell); ctx.lineTo(x + cell, y + cell); }
  }
  ctx.stroke();
}

class Panel {
  constructor(model) {
    this.model = model;
    this.node = $('panel').content.firstElementChild.cloneNode(true);
    this.node.querySelector('.title').textContent =
      model === 'dpar' ? `DPAR (θ = ${Number($('theta').value).toFixed(2)}, P = ${$('max_patch_len').value})` : 'Baseline (LlamaGen GPT)';
    this.image = this.node.querySelector('.image');
    this.heat = this.node.querySelector('.heat');
    this.g = info.grid;
    this.ids = new Array(info.codes).fill(-1);
    this.h = new Array(info.codes).fill(null);
    this.patches = 0;
    this.k = -1;
    this.frame = null;
    this.frameK = -1; // the last code the current frame shows
    this.done = false;
    this.t0 = performance.now();
    this.pending = false;
    $('panels').appendChild(this.node);
    this.draw();
  }

  set(cls, text) { this.node.querySelector(cls).textContent = text; }

  onCode(d) {
    if (this.k < 0 && !AUTOSTART) this.set('.first', `${(performance.now() - this.t0).toFixed(0)} ms from the click`);
    if (d.open) this.patches += 1;
    this.ids[d.k] = this.patches - 1;
    this.h[d.k] = d.h;
    this.k = d.k;
    const steps = this.model === 'dpar' ? this.patches : this.k + 1;
    this.set('.steps', `${steps} / ${this.k + 1}`);
    this.schedule();
  }

  onFrame(d) {
    const img = new Image();
    img.onload = () => { this.frame = img; this.frameK = Math.max(this.frameK, d.k); this.schedule(); };
    img.src = d.png;
  }

  onDone(d) {
    this.done = true;
    this.set('.steps', `${d.steps} / ${d.codes.length}` + (this.model === 'dpar' ? ` (mean patch length ${d.mean_patch_len.toFixed(2)})` : ''));
    const click = AUTOSTART ? '' : ` (image ${(performance.now() - this.t0).toFixed(0)} ms after the click)`;
    const queued = d.queue_ms > 1 ? `, after ${d.queue_ms.toFixed(0)} ms in the queue` : '';
    if (AUTOSTART) this.set('.first', `${d.first_code_ms.toFixed(0)} ms into the generation${queued}`);
    this.set('.wall', `${d.wall_ms.toFixed(0)} ms${click}`);
    const extra = [];
    if (d.frames_ms > 0) extra.push(`frames ${d.frames_ms.toFixed(0)} ms`);
    if (d.paused_ms > 0) extra.push(`slow motion ${(d.paused_ms / 1000).toFixed(1)} s`);
    this.set('.extra', extra.length ? extra.join(', ') : 'none');
    // Pauses leave the CPU idle between codes, which slows the codes themselves: time at full speed.
    this.set('.rate', d.paused_ms > 0 ? 'time it at full speed' : d.images_per_s.toFixed(2));
    this.ids = this.model === 'dpar' ? idsFromLengths(d.lengths) : this.ids;
    const img = new Image();
    img.onload = () => { this.frame = img; this.frameK = info.codes - 1; this.draw(); finished(); };
    img.src = d.png;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    const g = this.g, size = this.image.width, cell = size / g;
    const ctx = this.image.getContext('2d');
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = '#2a2e38';
    ctx.fillRect(0, 0, size, size);
    if (this.frame) ctx.drawImage(this.frame, 0, 0, size, size);
    // Codes not generated yet stay covered; codes generated since the last decoded frame are
    // shaded until the next one arrives.
    for (let k = Math.max(this.frameK + 1, 0); k < g * g; k++) {
      ctx.fillStyle = k <= this.k ? 'rgba(90,96,112,0.85)' : '#2a2e38';
      ctx.fillRect((k % g) * cell, Math.floor(k / g) * cell, cell, cell);
    }
    const dpar = this.model === 'dpar';
    if (this.k >= 0) outline(ctx, this.ids, this.k, g, size, dpar ? OUTLINE : 'rgba(255,255,255,0.25)', dpar ? 2 : 1);
    const hc = this.heat.getContext('2d');
    hc.fillStyle = '#0b0c10';
    hc.fillRect(0, 0, size, size);
    const top = Math.log(info.vocab);
    for (let k = 0; k <= this.k; k++) {
      hc.fillStyle = this.h[k] === null ? '#ffffff' : viridis(this.h[k] / top);
      hc.fillRect((k % g) * cell, Math.floor(k / g) * cell, cell, cell);
    }
    if (this.k >= 0) outline(hc, this.ids, this.k, g, size, dpar ? '#ffffff' : 'rgba(255,255,255,0.2)', dpar ? 2 : 1);
  }
}

function stopAll() {
  for (const s of streams) s.close();
  streams = [];
}

let sweeping = false;

function finished() {
  if (panels.length && panels.every((p) => p.done) && !sweeping) {
    document.body.dataset.done = '1';
    document.title = 'DPAR: done';
    $('go').disabled = false;
  }
}

async function check(query) {
  const r = await fetch('/api/settings?' + query);
  if (!r.ok) throw new Error(await r.text());
}

function stream(panel, query) {
  const es = new EventSource('/api/generate?' + query);
  streams.push(es);
  es.addEventListener('code', (e) => panel.onCode(JSON.parse(e.data)));
  es.addEventListener('frame', (e) => panel.onFrame(JSON.parse(e.data)));
  es.addEventListener('done', (e) => { es.close(); panel.onDone(JSON.parse(e.data)); });
  es.addEventListener('error', (e) => {
    es.close();
    if (panel.done) return;
    say(e.data ? 'generation failed: ' + JSON.parse(e.data).message : 'the stream failed: the server is busy or gone; try again');
    $('go').disabled = false;
  });
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  stopAll();
  say('');
  delete document.body.dataset.done;
  const models = mode() === 'side' ? ['dpar', 'gpt'] : [mode()];
  try {
    for (const m of models) await check(params(m));
  } catch (e) {
    say(e.message);
    return;
  }
  $('panels').innerHTML = '';
  $('panels').classList.toggle('side', models.length > 1);
  $('go').disabled = true;
  panels = models.map((m) => new Panel(m));
  panels.forEach((p) => stream(p, params(p.model)));
}

async function sweep() {
  const theta = Number($('theta').value);
  const thetas = [0.5, 0.75, 1, 1.25, 1.5].map((f) => (theta * f).toFixed(3));
  const query = params('dpar');
  query.delete('theta');
  query.delete('pace');
  query.set('thetas', thetas.join(','));
  $('sweep_strip').hidden = false;
  $('sweep_rows').innerHTML = '';
  $('sweep_note').textContent = 'generating…';
  $('sweep').disabled = true;
  sweeping = true;
  try {
    const r = await fetch('/api/sweep?' + query);
    if (!r.ok) throw new Error(await r.text());
    const d = await r.json();
    $('sweep_note').textContent = `class ${d.class}, seed ${d.seed}: the same draws, only θ changes`;
    for (const row of d.rows) {
      const fig = document.createElement('figure');
      const canvas = document.createElement('canvas');
      canvas.width = canvas.height = 160;
      const img = new Image();
      img.onload = () => {
        const ctx = canvas.getContext('2d');
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(img, 0, 0, 160, 160);
        outline(ctx, idsFromLengths(row.lengths), row.codes - 1, info.grid, 160, OUTLINE, 1);
      };
      img.src = row.png;
      const cap = document.createElement('figcaption');
      cap.innerHTML = `θ = ${row.theta.toFixed(2)}<br>mean length ${row.mean_patch_len.toFixed(2)}<br>${row.steps} steps / ${row.codes} codes`;
      fig.append(canvas, cap);
      $('sweep_rows').appendChild(fig);
    }
  } catch (e) {
    $('sweep_note').textContent = '';
    say(e.message);
  }
  $('sweep').disabled = false;
  sweeping = false;
  finished();
}

function download(name, url) {
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
}

function downloadPng() {
  const canvases = panels.map((p) => p.image);
  if (!canvases.length) { say('generate an image first'); return; }
  const out = document.createElement('canvas');
  out.width = canvases.reduce((w, c) => w + c.width, 0) + 8 * (canvases.length - 1);
  out.height = canvases[0].height;
  const ctx = out.getContext('2d');
  let x = 0;
  for (const c of canvases) { ctx.drawImage(c, x, 0); x += c.width + 8; }
  download(`dpar-class${$('class').value}-seed${$('seed').value}.png`, out.toDataURL('image/png'));
}

async function downloadSettings() {
  const model = mode() === 'gpt' ? 'gpt' : 'dpar';
  const r = await fetch('/api/settings?' + params(model));
  if (!r.ok) { say(await r.text()); return; }
  const text = JSON.stringify(await r.json(), null, 2);
  download('dpar-settings.json', URL.createObjectURL(new Blob([text], { type: 'application/json' })));
  say('saved the settings: `dpar sample --config dpar-settings.json` draws the same image');
}

function syncPatcher() {
  $('theta_out').textContent = Number($('theta').value).toFixed(2);
  const isStatic = $('static').checked;
  for (const id of ['theta', 'entropy_gate', 'max_len', 'row_reset', 'entropy_from']) $(id).disabled = isStatic;
  $('patcher').disabled = mode() === 'gpt';
}

async function start() {
  try {
    info = await (await fetch('/api/info')).json();
  } catch (e) {
    say('cannot reach the server: ' + e.message);
    return;
  }
  info.classes.forEach((name, i) => $('class').add(new Option(name, i)));
  const d = info.defaults;
  $('theta').max = Math.max(2 * d.theta, Math.log(info.vocab)).toFixed(2);
  $('theta').value = d.theta;
  $('max_patch_len').value = d.max_patch_len;
  $('max_patch_len').max = info.grid;
  $('top_k').max = info.vocab;
  for (const [id, key] of [['entropy_gate', 'entropy_gate'], ['max_len', 'max_len'], ['row_reset', 'row_reset']]) $(id).checked = d[key];
  if (!info.models.gpt) {
    for (const v of ['gpt', 'side']) document.querySelector(`input[value=${v}]`).disabled = true;
  }
  $('controls').addEventListener('submit', generate);
  $('controls').addEventListener('input', syncPatcher);
  // Each patcher's θ is on its own scale: switching sets the slider to that patcher's default
  // (self-entropy: the θ stored beside the model).
  $('entropy_from').addEventListener('change', () => {
    const t = $('entropy_from').value === 'self' && d.self_theta != null ? d.self_theta : d.theta;
    $('theta').value = t;
    syncPatcher();
  });
  $('dice').addEventListener('click', () => { $('seed').value = Math.floor(Math.random() * 1e6); });
  $('sweep').addEventListener('click', sweep);
  $('png').addEventListener('click', downloadPng);
  $('json').addEventListener('click', downloadSettings);
  syncPatcher();
  // ?autostart=dpar|gpt|side[&class=…&seed=…]: start at once (for demos and the browser test).
  const q = new URLSearchParams(location.search);
  for (const id of ['class', 'seed', 'pace']) if (q.has(id)) $(id).value = q.get(id);
  const auto = q.get('autostart');
  if (auto) {
    const radio = document.querySelector(`input[name=mode][value=${CSS.escape(auto)}]`);
    if (radio && !radio.disabled) radio.checked = true;
    syncPatcher();
    generate();
    if (q.get('sweep')) sweep();
  }
}

start();
