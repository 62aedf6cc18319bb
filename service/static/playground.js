// The playground: a form over POST /jobs with live progress (GET /jobs/{id}/events?preview=true), cancel
// (DELETE /jobs/{id}), side-by-side runs of two policies on one seed, a gallery, and A/B runs (POST /ab).
// An init image (img2img) and a mask painted over it (inpainting) go with a generation as data URLs.
import { apiKey, call, events, setApiKey } from "./api.js";
import { buildPolicyForm, policyLabel } from "./schema-form.js";

const $ = (id) => document.getElementById(id);
const MAX_SEED = 2 ** 31 - 1;
const AB_RUNS = "diffsteer.abRuns";
// what the form starts from for a model without recommendations (GET /models: its `defaults`)
const GENERIC = { policy: "cfg", steps: 20 };

const state = {
  policies: [],          // rows of GET /policies: {name, summary, parameters, schema}
  models: [],            // rows of GET /models: {name, family, schedulers, distilled_guidance, ...}
  schedulers: [],        // every scheduler name (GET /policies)
  loras: [],
  readers: {},           // slot -> () => policy object
  renders: {},           // slot -> (policy name) => rebuilds the slot's parameter form with that policy's defaults
  active: new Map(),     // job id -> {controller: AbortController of its event stream, final: DELETE's answer}
};

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function element(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el[k] = v;
  }
  el.append(...children);
  return el;
}

// --- set-up from /models and /policies -----------------------------------------------------------------

async function load() {
  try {
    const [models, policies] = await Promise.all([call("GET", "/models"), call("GET", "/policies")]);
    state.loras = models.loras;
    state.models = models.models;
    state.schedulers = policies.schedulers;
    $("model").replaceChildren(...models.models.map((m) => new Option(modelLabel(m), m.name, m.default, m.default)));
    $("model").onchange = showModel;
    state.policies = policies.policies;
    for (const fieldset of document.querySelectorAll("fieldset.policy")) setUpPolicy(fieldset);
    showModel();
    $("add-lora").disabled = state.loras.length === 0;
    $("lora-none").textContent = state.loras.length ? "" : "none on this server (lora_dir)";
    $("generate").disabled = false;
    setStatus("");
  } catch (error) {
    $("generate").disabled = true;
    setStatus(error.status === 401 ? "This server needs an API key (top right)." : String(error.message), true);
  }
}

function modelLabel(m) {
  const family = m.family_title ? ` · ${m.family_title}` : "";
  return m.name + family + (m.default ? " (default)" : "");
}

function selectedModel() {
  return state.models.find((m) => m.name === $("model").value) || {};
}

// The chosen model's schedulers (flow-matching models take fewer), its distilled guidance input (FLUX.1-dev)
// and its recommendations: choosing a model resets the steps and policy A to them.
function showModel() {
  const model = selectedModel();
  const names = model.schedulers || state.schedulers;
  const previous = $("scheduler").value;
  $("scheduler").replaceChildren(...names.map((s) => new Option(s, s)));
  $("scheduler").value = names.includes(previous) ? previous : "default";
  $("distilled-field").hidden = !model.distilled_guidance;
  const d = model.defaults || {};
  const parts = [
    model.family_title && `${model.family_title} (${model.schedule === "flow" ? "flow matching" : "diffusion"})`,
    d.native_size && `native ${d.native_size} px`,
    model.size_multiple && `sizes in multiples of ${model.size_multiple}`,
  ].filter(Boolean);
  $("model-info").textContent = parts.join(" · ");
  for (const id of ["width", "height"]) $(id).step = String(model.size_multiple || 8);
  applyRecommended();
}

// --- the model's recommended policy and steps ------------------------------------------------------------

function splitTopLevel(body) {
  // as the server's spec strings: commas inside [...] or {...} do not split
  const items = [];
  let depth = 0;
  let current = "";
  for (const ch of body) {
    if ("[{".includes(ch)) depth += 1;
    else if ("]}".includes(ch)) depth -= 1;
    if (ch === "," && depth === 0) {
      items.push(current);
      current = "";
    } else current += ch;
  }
  items.push(current);
  return items.map((s) => s.trim()).filter(Boolean);
}

/** A policy spec string ('cfg:scale=1.5', or JSON object text) as {name, key: value, ...}; null if unreadable. */
function parsePolicySpec(spec) {
  const text = String(spec ?? "").trim();
  if (text.startsWith("{")) {
    try { return JSON.parse(text); } catch { return null; }
  }
  const colon = text.indexOf(":");
  const policy = { name: (colon < 0 ? text : text.slice(0, colon)).trim() };
  for (const item of colon < 0 ? [] : splitTopLevel(text.slice(colon + 1))) {
    const eq = item.indexOf("=");
    if (eq <= 0) return null;
    const raw = item.slice(eq + 1).trim();
    let value;
    try { value = JSON.parse(raw); } catch { value = raw; }
    policy[item.slice(0, eq).trim()] = value;
  }
  return policy.name ? policy : null;
}

// The chosen model's recommendation, or the generic defaults: {policy: object, steps, spec (for people), own}.
function recommendation() {
  const d = selectedModel().defaults || {};
  const parsed = d.policy ? parsePolicySpec(d.policy) : null;
  const known = parsed && state.policies.some((p) => p.name === parsed.name);
  const policy = known ? parsed : { name: GENERIC.policy };
  const steps = d.steps || GENERIC.steps;
  const own = Boolean(known || d.steps);
  return { policy, steps, spec: known ? d.policy : own ? `${GENERIC.policy} (generic)` : GENERIC.policy, own };
}

function setPolicy(slot, policy) {
  const fieldset = document.querySelector(`fieldset.policy[data-slot="${slot}"]`);
  fieldset.querySelector(".policy-name").value = policy.name;
  state.renders[slot](policy.name);  // that policy's schema defaults first
  for (const [key, value] of Object.entries(policy)) {
    const el = key === "name" ? null : document.getElementById(`policy-${slot}-${key}`);
    if (!el) continue;
    if (el.type === "checkbox") el.checked = Boolean(value);
    else if (value === null) el.value = "";
    else el.value = typeof value === "object" ? JSON.stringify(value) : String(value);
  }
}

// Steps and policy A from the chosen model's recommendation (GET /models: defaults.policy, defaults.steps).
function applyRecommended() {
  if (!state.policies.length) return;
  const r = recommendation();
  $("steps").value = String(r.steps);
  setPolicy("A", r.policy);
  showRecommended(false);
}

function showRecommended(edited) {
  const r = recommendation();
  const what = `${r.spec}, ${r.steps} steps`;
  let text;
  if (edited) text = `Edited; ${r.own ? "recommended for this model" : "the generic defaults"}: ${what}.`;
  else if (!r.own) text = `No recommendations for this model: steps and policy A start from the generic ${what}.`;
  else text = `Steps and policy A: recommended for this model (${what}); choosing another model resets them.`;
  $("recommended-text").textContent = text;
  $("recommended").dataset.state = edited ? "edited" : r.own ? "recommended" : "generic";
  $("use-recommended").textContent = r.own ? "use recommended" : "reset";
  $("use-recommended").hidden = !edited;
}

function setUpPolicy(fieldset) {
  const slot = fieldset.dataset.slot;
  const select = fieldset.querySelector(".policy-name");
  const previous = select.value;
  select.replaceChildren(...state.policies.map((p) => new Option(p.name, p.name)));
  select.value = state.policies.some((p) => p.name === previous) ? previous : (slot === "B" && state.policies.some((p) => p.name === "apg") ? "apg" : "cfg");
  const render = () => {
    const row = state.policies.find((p) => p.name === select.value);
    fieldset.querySelector(".policy-summary").textContent = row.summary;
    state.readers[slot] = buildPolicyForm(fieldset.querySelector(".policy-params"), row.schema, `policy-${slot}`);
  };
  state.renders[slot] = render;
  select.onchange = render;
  render();
}

function addLoraRow() {
  const names = state.loras.map((n) => new Option(n, n));
  const row = element("div", { class: "lora-row" },
    element("select", { class: "lora-name" }, ...names),
    element("input", { class: "lora-weight", type: "number", step: "0.05", value: "1", title: "weight" }),
    element("button", { type: "button", textContent: "×", title: "remove", onclick: () => row.remove() }));
  $("lora-rows").append(row);
}

// --- init image and mask (img2img, inpainting) -----------------------------------------------------------

const MASK_COLOUR = [255, 0, 128];  // how painted pixels show over the image; the request's mask has them white
const init = { dataUrl: null, last: null };

// Large images are scaled down to the chosen model's native size: the generation defaults to the image's size,
// and the request body has a size limit (max_body_bytes).
function workingSize(width, height) {
  const model = state.models.find((m) => m.name === $("model").value) || {};
  const limit = model.native_size || model.defaults?.native_size || 1024;
  const scale = Math.min(1, limit / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

async function loadInitImage() {
  const file = $("init-image").files[0];
  if (!file) return removeInitImage();
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none" });  // the file's own pixel values
  } catch {
    setStatus(`${file.name}: not an image this browser can read`, true);
    return removeInitImage();
  }
  const [width, height] = workingSize(bitmap.width, bitmap.height);
  const canvas = element("canvas", { width, height });
  canvas.getContext("2d").drawImage(bitmap, 0, 0, width, height);
  const scaled = width !== bitmap.width ? ` (scaled down from ${bitmap.width}×${bitmap.height})` : "";
  bitmap.close();
  init.dataUrl = canvas.toDataURL("image/png");
  $("init-preview").src = init.dataUrl;
  const mask = $("mask-canvas");
  mask.width = width;  // also clears it
  mask.height = height;
  $("init-tools").hidden = false;
  $("init-info").textContent = `${width}×${height}${scaled}. Paint the area to repaint (sent as a white-on-black ` +
    "mask); without paint the whole image is redrawn (img2img). Empty width/height: the image's size.";
  setStatus("");
}

function removeInitImage() {
  init.dataUrl = null;
  $("init-image").value = "";
  $("init-preview").removeAttribute("src");
  $("init-tools").hidden = true;
}

function maskPoint(event) {
  const canvas = $("mask-canvas");
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * (canvas.height / rect.height), scale };
}

function paintStroke(from, to) {
  const ctx = $("mask-canvas").getContext("2d");
  const width = Number($("brush-size").value) * to.scale;  // the brush's size on screen
  ctx.strokeStyle = ctx.fillStyle = `rgb(${MASK_COLOUR.join(",")})`;
  ctx.lineWidth = width;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

function setUpMaskCanvas() {
  const canvas = $("mask-canvas");
  canvas.onpointerdown = (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    init.last = maskPoint(event);
    paintStroke(init.last, init.last);
  };
  canvas.onpointermove = (event) => {
    if (!init.last) return;
    const point = maskPoint(event);
    paintStroke(init.last, point);
    init.last = point;
  };
  canvas.onpointerup = canvas.onpointercancel = () => { init.last = null; };
}

// Painted pixels (alpha at least half, so antialiased edges are decided one way) as 0/1 per pixel.
function paintedPixels() {
  const canvas = $("mask-canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const painted = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0; i < painted.length; i++) painted[i] = data[4 * i + 3] >= 128 ? 1 : 0;
  return painted;
}

function drawMask(painted) {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(canvas.width, canvas.height);
  painted.forEach((on, i) => {
    image.data.set(on ? [...MASK_COLOUR, 255] : [0, 0, 0, 0], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
}

function invertMask() {
  drawMask(paintedPixels().map((on) => 1 - on));
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

// The mask as the API takes it: white repaints, black keeps; null when nothing is painted.
function maskDataUrl() {
  const painted = paintedPixels();
  if (!painted.some((on) => on)) return null;
  const source = $("mask-canvas");
  const canvas = element("canvas", { width: source.width, height: source.height });
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(source.width, source.height);
  painted.forEach((on, i) => {
    const v = on ? 255 : 0;
    image.data.set([v, v, v, 255], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
  return canvas.toDataURL("image/png");
}

// --- requests ------------------------------------------------------------------------------------------

function optionalInt(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number.parseInt(text, 10);
}

function baseRequest() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value.trim() || null,
    model: $("model").value || null,
    scheduler: $("scheduler").value,
    steps: optionalInt("steps") ?? recommendation().steps,
    num_images: optionalInt("num-images") ?? 1,
    width: optionalInt("width"),
    height: optionalInt("height"),
    lora: [...document.querySelectorAll(".lora-row")].map((row) => ({
      name: row.querySelector(".lora-name").value, weight: Number(row.querySelector(".lora-weight").value),
    })),
  };
  if (init.dataUrl) {
    body.init_image = init.dataUrl;
    body.strength = Number($("strength").value);
    const mask = maskDataUrl();
    if (mask) body.mask = mask;
  }
  const distilled = $("distilled-field").hidden ? "" : $("distilled-guidance").value.trim();
  if (distilled !== "") body.distilled_guidance = Number(distilled);
  // one seed for every run of this submission, so side-by-side images differ by their policy only
  body.seed = optionalInt("seed") ?? Math.floor(Math.random() * MAX_SEED);
  return body;
}

function sideBySide() {
  return $("side-by-side").checked;
}

// The outcome of one submission for the status line: a failure first, then a cancel, else done.
function summarise(outcomes, seed) {
  const failed = outcomes.find((o) => o.outcome === "failed");
  if (failed) {
    const which = outcomes.length > 1 ? ` (${failed.label})` : "";
    return setStatus(`Failed${which}: ${failed.message}`, true);
  }
  if (outcomes.some((o) => o.outcome === "cancelled")) return setStatus("Cancelled");
  if (outcomes.every((o) => o.outcome === "succeeded")) return setStatus(`Done · seed ${seed}`);
  return setStatus("Ended without a result (the connection to the server was lost?)", true);
}

async function generate(event) {
  event.preventDefault();
  if (state.active.size || $("generate").disabled) return;
  const base = baseRequest();
  const slots = sideBySide() ? ["A", "B"] : ["A"];
  const group = element("div", { class: "run-group" });
  $("runs").prepend(group);
  $("generate").disabled = true;
  setStatus(`Running… seed ${base.seed}`);
  try {
    const outcomes = await Promise.all(slots.map((slot) => runJob({ ...base, policy: state.readers[slot]() }, slot, group)));
    const done = outcomes.filter((o) => o.outcome === "succeeded");
    if (done.length) addToGallery(done);
    summarise(outcomes, base.seed);
  } catch (error) {
    setStatus(`Failed: ${error.message}`, true);
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = state.active.size === 0;
  }
}

// One job: its card under Runs with progress and previews, until it ends. Returns {outcome, message, slot,
// label, result}; outcome is succeeded, failed, cancelled or ended (the stream stopped without a verdict).
async function runJob(body, slot, group) {
  const label = `${slot}: ${policyLabel(body.policy)}`;
  const bar = element("progress", { max: body.steps, value: 0 });
  const stateText = element("span", { class: "run-state", textContent: "queued" });
  const previews = element("div", { class: "previews" });
  const card = element("div", { class: "run", dataset: { slot } },
    element("div", { class: "run-label", textContent: label }), bar, stateText, previews);
  group.append(card);
  const end = (outcome, message = "") => {
    stateText.textContent = outcome === "cancelled" ? `cancelled at step ${bar.value}/${bar.max}`
      : outcome === "failed" ? `failed: ${message}` : outcome;
    card.classList.add(outcome);
    return { outcome, message, slot, label, result: null };
  };
  let job;
  try {
    job = await call("POST", "/jobs", body);
  } catch (error) {
    return end("failed", error.message);
  }
  card.dataset.job = job.id;
  const entry = { controller: new AbortController(), final: null };
  state.active.set(job.id, entry);
  $("cancel").disabled = false;
  let outcome = "ended";
  let message = "";
  try {
    for await (const e of events(`/jobs/${encodeURIComponent(job.id)}/events?preview=true`, entry.controller.signal)) {
      if (e.event === "started") stateText.textContent = "running";
      else if (e.event === "step") {
        if (e.data.total) bar.max = e.data.total;
        bar.value = e.data.step;
        stateText.textContent = `step ${e.data.step}/${e.data.total ?? "?"} · ${e.data.nfe} NFE`;
        if (e.data.preview) {
          previews.replaceChildren(...e.data.preview.map((b64) => element("img", { src: `data:image/png;base64,${b64}`, alt: "preview" })));
        }
      } else if (["succeeded", "failed", "cancelled"].includes(e.event)) {
        outcome = e.event;
        message = e.data.error?.message ?? e.event;
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") [outcome, message] = ["failed", error.message];
  } finally {
    state.active.delete(job.id);
    $("cancel").disabled = state.active.size === 0;
  }
  // DELETE's answer when it came first (its stream aborted): a cancelled job, or one that had just finished
  // (DELETE forgets a finished job; its answer carries the result)
  const final = entry.final;
  if (final && outcome === "ended") [outcome, message] = [final.status, final.error?.message ?? final.status];
  if (outcome !== "succeeded") return end(outcome, message);
  let result = final?.result;
  if (!result) {
    try {
      result = (await call("GET", `/jobs/${encodeURIComponent(job.id)}`)).result;
    } catch (error) {
      return end("failed", error.message);
    }
  }
  bar.value = bar.max;
  card.remove();
  if (!group.children.length) group.remove();
  return { outcome, message: "", slot, label, result };
}

async function cancelAll() {
  const ids = [...state.active.keys()];
  if (!ids.length) return;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  await Promise.all(ids.map(async (id) => {
    try {
      const answer = await call("DELETE", `/jobs/${encodeURIComponent(id)}`);
      const entry = state.active.get(id);
      if (entry && ["succeeded", "failed", "cancelled"].includes(answer?.status)) {
        entry.final = answer;
        entry.controller.abort();
      }
    } catch (error) {
      if (state.active.has(id)) setStatus(`Cancel failed: ${error.message}`, true);
    }
  }));
  $("cancel").disabled = state.active.size === 0;
}

// --- gallery -------------------------------------------------------------------------------------------

function pngBlobUrl(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type: `image/${format}` }));
}

function imageCard(run, k) {
  const r = run.result;
  const meta = r.metadata[k] || {};
  const url = pngBlobUrl(r.images[k], r.format);
  const name = `diffsteer-${meta.seed ?? r.seeds[k]}-${r.policy.replace(/[^A-Za-z0-9_.=-]+/g, "_")}.${r.format}`;
  const params = element("dl", {}, ...Object.entries(meta).flatMap(([key, value]) =>
    [element("dt", { textContent: key }), element("dd", { textContent: typeof value === "object" ? JSON.stringify(value) : String(value) })]));
  const json = URL.createObjectURL(new Blob([JSON.stringify(meta, null, 2)], { type: "application/json" }));
  return element("figure", { class: "image-card", dataset: { slot: run.slot, seed: String(r.seeds[k]), policy: r.policy } },
    element("img", { src: url, alt: `${r.policy} seed ${r.seeds[k]}` }),
    element("figcaption", {},
      element("div", { class: "run-label", textContent: `${run.slot}: ${r.policy}` }),
      element("details", {}, element("summary", { textContent: `seed ${r.seeds[k]} · ${r.steps} steps · ${r.nfe[k]} NFE · ${r.model}` }), params),
      element("a", { href: url, download: name, class: "download", textContent: `download ${r.format} (parameters inside)` }),
      " · ",
      element("a", { href: json, download: name.replace(/\.\w+$/, ".json"), textContent: "parameters.json" })));
}

function addToGallery(runs) {
  const entry = element("div", { class: runs.length > 1 ? "gallery-entry comparison" : "gallery-entry" });
  for (const run of runs) {
    for (let k = 0; k < run.result.images.length; k++) entry.append(imageCard(run, k));
  }
  $("gallery").prepend(entry);
}

// --- A/B runs ------------------------------------------------------------------------------------------

function abRuns() {
  try { return JSON.parse(sessionStorage.getItem(AB_RUNS) || "[]"); } catch { return []; }
}

function renderAbRun(run) {
  let item = document.querySelector(`li[data-ab="${CSS.escape(run.id)}"]`);
  if (!item) {
    item = element("li", { dataset: { ab: run.id } });
    $("ab-runs").prepend(item);
  }
  const link = run.report ? element("a", { href: run.report, target: "_blank", rel: "noopener", textContent: "report" }) : "";
  item.replaceChildren(`${run.label} — ${run.status} `, link);
}

function saveAbRun(run) {
  const runs = abRuns().filter((r) => r.id !== run.id);
  runs.unshift(run);
  sessionStorage.setItem(AB_RUNS, JSON.stringify(runs.slice(0, 20)));
  renderAbRun(run);
}

async function runAb() {
  const base = baseRequest();
  const arms = ["A", "B"].map((slot) => ({ name: slot, policy: state.readers[slot]() }));
  const body = { arms, prompts: [base.prompt], seeds: 4, batch_size: 4, seed: base.seed, steps: base.steps,
                 scheduler: base.scheduler, model: base.model, width: base.width, height: base.height };
  const label = `A/B ${policyLabel(arms[0].policy)} vs ${policyLabel(arms[1].policy)}`;
  let job;
  setStatus("A/B run: starting…");
  try {
    job = await call("POST", "/ab", body);
  } catch (error) {
    setStatus(error.status === 403 ? "A/B runs are not enabled on this server (set ab_dir)." : `A/B run failed: ${error.message}`, true);
    return;
  }
  const run = { id: job.id, label, status: "queued", report: null };
  saveAbRun(run);
  setStatus("A/B run: queued (progress under A/B reports)");
  try {
    for await (const e of events(`/ab/${encodeURIComponent(job.id)}/events`)) {
      if (e.event === "progress") run.status = `${e.data.stage} ${e.data.done ?? ""}/${e.data.total ?? ""}`;
      else if (["succeeded", "failed", "cancelled"].includes(e.event)) run.status = e.event;
      if (e.event === "succeeded") {
        run.report = `/ab/${encodeURIComponent(job.id)}/report.html`;
        setStatus("A/B run done: its report is linked under A/B reports");
      } else if (e.event === "failed") setStatus(`A/B run failed: ${e.data.error?.message ?? "failed"}`, true);
      else if (e.event === "cancelled") setStatus("A/B run cancelled");
      saveAbRun(run);
    }
  } catch (error) {
    setStatus(`A/B run failed: ${error.message}`, true);
  }
}

// --- wiring --------------------------------------------------------------------------------------------

function main() {
  $("api-key").value = apiKey();
  $("key-state").textContent = apiKey() ? "key set for this tab" : "";
  $("key-form").onsubmit = (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim());
    $("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
    load();
  };
  $("side-by-side").onchange = () => {
    document.querySelector('fieldset.policy[data-slot="B"]').hidden = !sideBySide();
    $("run-ab").hidden = !sideBySide();
  };
  $("add-lora").onclick = addLoraRow;
  $("init-image").onchange = loadInitImage;
  $("init-remove").onclick = removeInitImage;
  $("mask-clear").onclick = clearMask;
  $("mask-invert").onclick = invertMask;
  $("strength").oninput = () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); };
  $("brush-size").oninput = () => { $("brush-value").textContent = $("brush-size").value; };
  setUpMaskCanvas();
  $("gen-form").onsubmit = generate;
  $("use-recommended").onclick = applyRecommended;
  const edited = () => showRecommended(true);
  $("steps").addEventListener("input", edited);
  document.querySelector('fieldset.policy[data-slot="A"]').addEventListener("input", edited);
  document.querySelector('fieldset.policy[data-slot="A"]').addEventListener("change", edited);
  $("cancel").onclick = cancelAll;
  $("run-ab").onclick = runAb;
  for (const run of abRuns().reverse()) renderAbRun(run);
  load();
}

main();
