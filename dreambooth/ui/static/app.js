// DreamBooth web app: one page over the JSON API in dreambooth/ui/server.py.
// State lives on the server (photo sets, jobs); the page keeps only the current set id and the form
// in localStorage, so a reload shows the same thing. The running job's progress arrives as
// server-sent events; nothing polls. DOM is built with textContent, never innerHTML, because file
// names and prompts come from the user.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, set: null, jobs: [], genJob: null, stream: null, streamJob: null, generating: false };
const FORM_FIELDS = ["identifier", "class-noun", "custom-model", "steps", "lr", "class-images", "sample-every"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "width") node.style.width = value;  // CSSOM: allowed by the page's CSP, inline style is not
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(method, url, body, headers = {}) {
  const init = { method, headers: { "X-Dreambooth": "1", ...headers } };
  if (body instanceof Blob || body instanceof FormData) init.body = body;
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const response = await fetch(url, init);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw Object.assign(new Error(data.error || `HTTP ${response.status}`), { problems: data.problems || [] });
  return data;
}

function showProblems(list, problems) {
  list.replaceChildren(...problems.map((p) => el("li", { class: p.severity || "error" },
    p.where && !p.where.startsWith("/") ? `${p.where}: ${p.message}` : p.message)));
}

// --- screens -----------------------------------------------------------------------------------
function route() {
  const [screen, arg] = (location.hash.slice(1) || "new").split("/");
  for (const name of ["new", "jobs", "generate"]) $(`screen-${name}`).hidden = name !== screen;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.screen === screen));
  if (screen === "generate") { if (arg) state.genJob = arg; renderGenerate(); }
}

// --- photos ------------------------------------------------------------------------------------
async function ensureSet() {
  const saved = localStorage.getItem("setId");
  if (saved) { try { return await loadSet(saved); } catch (e) { /* expired: make a new one */ } }
  const created = await api("POST", "/api/photosets");
  localStorage.setItem("setId", created.id);
  return loadSet(created.id);
}

async function loadSet(id) {
  state.set = await api("GET", `/api/photosets/${id}?resolution=${resolution()}`);
  renderSet();
  return state.set;
}

function resolution() { return Number(localStorage.getItem("resolution") || 512); }

async function uploadFiles(files) {
  const limits = state.info.limits;
  for (const file of files) {
    if (file.size > limits.bytes) {
      addLocalRejection(file.name, `is ${(file.size / 2 ** 20).toFixed(1)} MB, over the ${limits.bytes / 2 ** 20} MB limit`);
      continue;
    }
    const form = new FormData();
    form.append("photo", file, file.name);
    try {
      await api("POST", `/api/photosets/${state.set.id}/photos`, form);
    } catch (e) { /* the server recorded the rejection; the set reload shows it */ }
  }
  await loadSet(state.set.id);
}

const localRejections = [];
function addLocalRejection(name, message) { localRejections.push({ name, message }); }

function renderSet() {
  const set = state.set;
  const byPhoto = {};
  for (const p of set.problems) if (p.photo) (byPhoto[p.photo] = byPhoto[p.photo] || []).push(p);
  $("thumbs").replaceChildren(...set.photos.map((photo) => thumbCard(photo, byPhoto[photo.id] || [])));
  showProblems($("set-problems"), set.problems.filter((p) => !p.photo));
  const rejected = [...set.rejected, ...localRejections];
  $("rejected").replaceChildren(...rejected.map((r) => el("div", { class: "alert" },
    el("button", { type: "button", title: "dismiss", onclick: clearRejected }, "×"),
    el("strong", {}, r.name), ` ${r.message}`)));
}

function thumbCard(photo, problems) {
  const tags = [];
  if (photo.exif_rotated) tags.push(el("span", { class: "tag info" }, "EXIF rotation applied"));
  for (const p of problems) tags.push(el("span", { class: `tag ${p.severity}`, title: p.message }, shortProblem(p.message)));
  return el("div", { class: `thumb ${problems.length ? "has-warning" : ""}` },
    el("img", { src: photo.url, alt: photo.original_name }),
    el("button", { class: "remove", type: "button", title: "remove", onclick: () => removePhoto(photo.id) }, "×"),
    el("div", { class: "meta" }, el("div", { class: "name", title: photo.original_name }, photo.original_name),
      `${photo.width}×${photo.height}`, el("div", {}, tags)));
}

function shortProblem(message) {
  if (message.includes("smaller than the training resolution")) return "small: will be upscaled";
  if (message.toLowerCase().includes("duplicate") || message.includes("near-identical")) return "duplicate";
  return message.length > 40 ? message.slice(0, 38) + "…" : message;
}

async function removePhoto(photoId) {
  await api("DELETE", `/api/photosets/${state.set.id}/photos/${photoId}`);
  await loadSet(state.set.id);
}

async function clearRejected() {
  localRejections.length = 0;
  await api("POST", `/api/photosets/${state.set.id}/clear-rejected`, {});
  await loadSet(state.set.id);
}

function setUpDropzone() {
  const zone = $("dropzone");
  $("file-input").addEventListener("change", (e) => { uploadFiles([...e.target.files]); e.target.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); uploadFiles([...e.dataTransfer.files]); });
  const l = state.info.limits;
  $("limits-hint").textContent = `JPEG, PNG or WebP · up to ${l.files} photos, ${l.bytes / 2 ** 20} MB and ${l.pixels / 1e6} megapixels each`;
}

// --- subject, model, settings ------------------------------------------------------------------
function modelValue() { return $("model").value === "custom" ? $("custom-model").value.trim() : $("model").value; }
function presetValue() { return document.querySelector("input[name=preset]:checked").value; }

async function checkIdentifier() {
  const data = await api("POST", "/api/identifier/check", { identifier: $("identifier").value, class_noun: $("class-noun").value });
  showProblems($("identifier-problems"), data.problems);
}

async function suggest() {
  const seed = Math.floor(Math.random() * 1e6);
  const data = await api("GET", `/api/identifier/suggest?seed=${seed}`);
  $("suggestions").replaceChildren(...data.identifiers.map((word) => el("button", {
    class: "chip", type: "button", onclick: () => { $("identifier").value = word; saveForm(); checkIdentifier(); } }, word)));
}

function showModelNote() {
  $("custom-model-field").hidden = $("model").value !== "custom";
  const note = (state.info.model_notes || {})[modelValue()];
  $("model-note").hidden = !note;
  $("model-note").textContent = note || "";
}

async function checkModel() {
  showModelNote();
  const model = modelValue();
  const data = model ? await api("POST", "/api/model/check", { model }) : { problems: [] };
  showProblems($("model-problems"), data.problems);
  await loadPresetDefaults();
}

async function loadPresetDefaults() {
  const model = modelValue() || "tiny-random";
  const purpose = presetValue();
  try {
    const d = await api("GET", `/api/presets?purpose=${purpose}&model=${encodeURIComponent(model)}`);
    if (purpose !== presetValue() || model !== (modelValue() || "tiny-random")) return;  // a newer choice won
    $("steps").value = d.steps; $("lr").value = d.lr; $("class-images").value = d.class_images;
    $("sample-every").value = d.sample_every; $("prior").checked = d.prior;
    localStorage.setItem("resolution", d.resolution);
    $("train-note").textContent = `preset ${d.preset} · ${d.resolution} px`;
    for (const [purpose, about] of Object.entries(d.about || {})) {  // an SDXL model's cards differ from SD 1.5's
      const card = document.querySelector(`input[name=preset][value=${purpose}]`);
      if (card) card.parentElement.querySelector("small").textContent = about;
    }
    saveForm();  // the saved form must hold this preset's values, or a reload restores the last preset's
    if (state.set) await loadSet(state.set.id);
  } catch (e) { $("train-note").textContent = e.message; }
}

// Numbers go to the server as typed: it parses them and names any field it cannot read.
function formValues() {
  return { identifier: $("identifier").value, class_noun: $("class-noun").value, model: modelValue(),
    preset: presetValue(), steps: $("steps").value, lr: $("lr").value, prior: $("prior").checked,
    class_images: $("class-images").value, sample_every: $("sample-every").value };
}

function saveForm() {
  const saved = Object.fromEntries(FORM_FIELDS.map((id) => [id, $(id).value]));
  saved.model = $("model").value; saved.preset = presetValue(); saved.prior = $("prior").checked;
  localStorage.setItem("form", JSON.stringify(saved));
}

function restoreForm() {
  const saved = JSON.parse(localStorage.getItem("form") || "{}");
  for (const id of FORM_FIELDS) if (saved[id] !== undefined) $(id).value = saved[id];
  if (saved.model && [...$("model").options].some((o) => o.value === saved.model)) $("model").value = saved.model;
  if (saved.preset) document.querySelector(`input[name=preset][value=${saved.preset}]`).checked = true;
  if (saved.prior !== undefined) $("prior").checked = saved.prior;
}

async function startTraining() {
  $("train").disabled = true;
  showProblems($("submit-problems"), []);
  try {
    const job = await api("POST", "/api/jobs", { set_id: state.set.id, form: formValues() });
    location.hash = "jobs";
    await refreshJobs();
    return job;
  } catch (e) {
    showProblems($("submit-problems"), e.problems.length ? e.problems : [{ message: e.message }]);
  } finally { $("train").disabled = false; }
}

// --- jobs --------------------------------------------------------------------------------------
const isActive = (job) => job.status === "running" || job.status === "queued";

async function refreshJobs() {
  state.jobs = (await api("GET", "/api/jobs")).jobs;
  renderJobs();
  const next = state.jobs.find((j) => j.status === "running") || state.jobs.slice().reverse().find(isActive);
  subscribe(next ? next.id : null);
}

function renderJobs() {
  const active = state.jobs.filter(isActive).length;
  $("jobs-badge").hidden = active === 0;
  $("jobs-badge").textContent = active;
  $("jobs-empty").hidden = state.jobs.length > 0;
  $("jobs-list").replaceChildren(...state.jobs.map(jobCard));
  if (!$("screen-generate").hidden) renderGenerateJobs();
}

// One stream, for the running job (or the next queued one): each event is the job's new state.
function subscribe(jobId) {
  if (state.streamJob === jobId) return;
  if (state.stream) state.stream.close();
  state.stream = null; state.streamJob = jobId;
  if (!jobId) return;
  const stream = new EventSource(`/api/jobs/${jobId}/events`);
  stream.addEventListener("job", (e) => updateJob(JSON.parse(e.data)));
  stream.addEventListener("end", () => { stream.close(); state.stream = null; state.streamJob = null; refreshJobs(); });
  state.stream = stream;
}

function updateJob(job) {
  const index = state.jobs.findIndex((j) => j.id === job.id);
  const wasActive = index >= 0 && isActive(state.jobs[index]);
  if (index < 0) state.jobs.unshift(job); else state.jobs[index] = job;
  const card = document.querySelector(`.job[data-job="${job.id}"]`);
  if (card && wasActive === isActive(job)) {
    card.replaceWith(jobCard(job));
    if (!$("screen-generate").hidden) renderGenerateJobs();
  } else renderJobs();
}

function elapsed(job) {
  return job.phase_started ? ` · ${formatSeconds(Math.max(0, Date.now() / 1000 - job.phase_started))}` : "";
}

function progress(job) {
  if (job.status === "finished") return [1, `Finished · ${job.step} steps${job.loss !== null ? ` · final loss ${job.loss.toFixed(4)}` : ""}`];
  if (job.status === "queued") return [0, job.queue_position ? `Waiting: position ${job.queue_position} in the queue` : "Waiting"];
  const frac = job.total_steps ? job.step / job.total_steps : 0;
  if (job.status === "running") {
    if (job.phase === "loading") return [0, "Loading the model …"];
    if (job.phase === "class images") {
      const count = job.class_total ? `${job.class_done}/${job.class_total}` : `(${job.phase_total})`;
      return [job.class_total ? job.class_done / job.class_total : 0,
        `Generating class images ${count} (made once, then cached)${elapsed(job)}`];
    }
    if (job.phase === "caching latents") return [0, `Caching latents of ${job.phase_total} images …${elapsed(job)}`];
    if (job.phase === "validation images") {
      return [frac, `Step ${job.step}/${job.total_steps} · rendering ${job.phase_total} validation images …${elapsed(job)}`];
    }
  }
  let label = `Step ${job.step}/${job.total_steps}`;
  if (job.loss !== null) label += ` · loss ${job.loss.toFixed(4)}`;
  if (job.status === "running" && job.eta_seconds !== null) label += ` · about ${formatSeconds(job.eta_seconds)} left`;
  if (job.status === "stopped") label += ` · stopped, checkpoint ${job.checkpoint} kept`;
  return [frac, label];
}

function formatSeconds(s) {
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function sampleFigure(job, url) {
  const step = Number((url.match(/step-(\d+)/) || [0, 0])[1]);
  const rows = job.sample_prompts.map((p, i) => el("li", {}, p));
  return el("figure", {}, el("img", { src: url, alt: `validation images at step ${step}` }),
    el("figcaption", {}, `step ${step} · one row per prompt:`, el("ol", { class: "rows" }, rows)));
}

// Checkpoint scores of a toy-world job (open-set subject fidelity, prompt fidelity, drift), the kept one marked.
function scoreTable(job) {
  if (!job.scores || !job.scores.length) return null;
  const fmt = (v) => (v === null || v === undefined ? "–" : v.toFixed(2));
  const kept = job.selected ? job.selected.step : null;
  const rows = [...job.scores].sort((a, b) => a.step - b.step).map((r) =>
    el("tr", { class: r.step === kept ? "kept" : "" }, el("td", {}, String(r.step) + (r.step === kept ? " (kept)" : "")),
      el("td", {}, fmt(r.fidelity)), el("td", {}, fmt(r.prompt_fidelity)), el("td", {}, fmt(r.drift))));
  return el("div", { class: "scores" },
    el("table", {}, el("caption", {}, "Checkpoint scores"),
      el("tr", {}, ["step", "subject fidelity", "prompt fidelity", "drift"].map((h) => el("th", {}, h))), rows),
    job.selected ? el("p", { class: "hint" }, job.selected.reason) : null);
}

function jobCard(job) {
  const [fraction, label] = progress(job);
  const buttons = [];
  if (isActive(job)) {
    buttons.push(el("button", { class: "danger", type: "button", onclick: () => jobCommand(job.id, "cancel") }, "Cancel"));
  }
  if (job.resumable) {
    buttons.push(el("button", { class: "secondary", type: "button", onclick: () => jobCommand(job.id, "resume") }, "Resume"));
  }
  if (job.status === "finished") buttons.push(el("a", { href: `#generate/${job.id}` }, el("button", { class: "primary", type: "button" }, "Generate")));
  return el("div", { class: "card job", "data-job": job.id, "data-status": job.status },
    el("div", { class: "job-head" }, el("h3", { title: job.name }, job.name), el("span", { class: `status ${job.status}` }, job.status),
      el("span", { class: "spacer" }), buttons),
    el("div", { class: `bar ${job.status === "finished" ? "done" : ""}` }, el("div", { width: `${Math.round(100 * fraction)}%` })),
    el("div", { class: "progress-label" }, label),
    job.error ? el("div", { class: "error-text" }, job.error) : null,
    job.sample_urls.length ? el("div", { class: "samples" }, job.sample_urls.map((url) => sampleFigure(job, url))) : null,
    scoreTable(job),
    job.notices.length ? el("ul", { class: "notices" }, job.notices.slice(-4).map((n) => el("li", {}, n))) : null);
}

async function jobCommand(id, command) {
  try { await api("POST", `/api/jobs/${id}/${command}`, {}); } catch (e) { alert(e.message); }
  await refreshJobs();
}

// The elapsed time of a slow phase ticks here, on the page: no request needed.
setInterval(() => {
  const job = state.jobs.find((j) => j.status === "running" && j.phase_started && j.phase !== "training");
  const card = job && document.querySelector(`.job[data-job="${job.id}"] .progress-label`);
  if (card) card.textContent = progress(job)[1];
}, 1000);

// --- generate ----------------------------------------------------------------------------------
function renderGenerateJobs() {
  const finished = state.jobs.filter((j) => j.status === "finished");
  const select = $("gen-job");
  const current = state.genJob && finished.some((j) => j.id === state.genJob) ? state.genJob : finished[0]?.id;
  if (select.dataset.ids !== finished.map((j) => j.id).join()) {
    select.replaceChildren(...finished.map((j) => el("option", { value: j.id }, `${j.name} · ${j.step} steps`)));
    select.dataset.ids = finished.map((j) => j.id).join();
  }
  if (current) select.value = current;
  $("gen-empty").hidden = finished.length > 0;
  $("generate").disabled = finished.length === 0 || state.generating;  // never re-enabled mid-request
  return current;
}

async function renderGenerate() {
  const id = renderGenerateJobs();
  if (!id) return;
  if (state.genJob !== id || !$("examples").childElementCount) {
    state.genJob = id;
    const ex = await api("GET", `/api/jobs/${id}/examples`);
    $("examples").replaceChildren(...ex.prompts.map((p) => el("button", {
      class: "chip", type: "button", onclick: () => { $("prompt").value = p; } }, p.replace("{identifier}", ex.identifier).replace("{class}", ex.class_noun))));
  }
  state.genJob = id;
  const job = state.jobs.find((j) => j.id === id);
  renderGallery(job ? job.generated : []);
  renderDownloads(await api("GET", `/api/jobs/${id}/downloads`));
}

function renderGallery(images) {
  if (!images.length) { $("gallery").replaceChildren(el("p", { class: "muted" }, "Generated images appear here.")); return; }
  const newestFirst = [...images].sort((a, b) => (b.batch ?? 0) - (a.batch ?? 0) || a.seed - b.seed);
  $("gallery").replaceChildren(...newestFirst.map((g) => el("figure", {},
    el("a", { href: `${g.url}?download=1`, title: "download" }, el("img", { src: g.url, alt: g.prompt })),
    el("figcaption", {}, `${g.prompt} · seed ${g.seed}`))));
}

function renderDownloads(data) {
  $("downloads-note").textContent = data.note || "";
  $("downloads").replaceChildren(...data.items.map((d) => el("li", { class: d.default ? "default" : "" },
    el("a", { href: d.url, download: "", "data-format": d.format }, d.label), d.default ? el("span", { class: "tag info" }, "pick this one") : null)));
}

async function generate() {
  if (state.generating) return;
  const button = $("generate");
  state.generating = true;
  button.disabled = true; button.classList.add("busy");
  showProblems($("gen-problems"), []);
  try {
    await api("POST", `/api/jobs/${state.genJob}/generate`, { prompt: $("prompt").value, seed: Number($("seed").value),
      num: Number($("num").value), steps: Number($("gen-steps").value) });
    updateJob(await api("GET", `/api/jobs/${state.genJob}`));
  } catch (e) {
    showProblems($("gen-problems"), e.problems.length ? e.problems : [{ message: e.message }]);
  } finally {
    state.generating = false;
    button.disabled = false; button.classList.remove("busy");
  }
  await renderGenerate();
}

// --- start -------------------------------------------------------------------------------------
async function main() {
  state.info = await api("GET", "/api/info");
  const options = state.info.models.map((m) => el("option", { value: m.value }, m.label));
  options.push(el("option", { value: "custom" }, state.info.online ? "Local folder, file or hub id …" : "Local folder or .safetensors file …"));
  $("model").replaceChildren(...options);
  restoreForm();
  setUpDropzone();
  $("suggest").addEventListener("click", suggest);
  for (const id of ["identifier", "class-noun"]) $(id).addEventListener("change", () => { saveForm(); checkIdentifier(); });
  $("model").addEventListener("change", () => { saveForm(); checkModel(); });
  $("custom-model").addEventListener("change", () => { saveForm(); checkModel(); });
  document.querySelectorAll("input[name=preset]").forEach((r) => r.addEventListener("change", () => { saveForm(); loadPresetDefaults(); }));
  for (const id of ["steps", "lr", "class-images", "sample-every", "prior"]) $(id).addEventListener("change", saveForm);
  $("train").addEventListener("click", startTraining);
  $("generate").addEventListener("click", generate);
  $("gen-job").addEventListener("change", () => { state.genJob = $("gen-job").value; $("examples").replaceChildren(); renderGenerate(); });
  window.addEventListener("hashchange", route);
  const saved = JSON.parse(localStorage.getItem("form") || "{}");
  await ensureSet();
  if (saved.steps) showModelNote(); else await checkModel();
  await checkIdentifier();
  await refreshJobs();
  route();
  document.body.dataset.ready = "1";
}

main().catch((e) => { document.body.prepend(el("div", { class: "alert" }, `The app failed to start: ${e.message}`)); });
