// The std-daq dashboard: one EventSource on ui/events; 'snapshot' events carry everything shown
// (a DashboardSnapshot), 'image' events the newest rendered image. No polling, no framework.
//
// Every shown number is an element with data-key (its path in the snapshot) and data-value (the raw
// number) next to its formatted text, so scripts and tests can read exactly what is displayed.

const $ = (id) => document.getElementById(id);

let lastSnapshotAt = 0;
let interval = 0.5;
let lastLogSignature = "";
let latestLogs = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function get(obj, path) {
  let value = obj;
  for (const part of path.split(".")) {
    if (value === null || value === undefined) return null;
    value = value[part];
  }
  return value === undefined ? null : value;
}

function grouped(n, digits = 0) {
  return n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function bytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${Math.round(n)} B`;
}

function duration(s) {
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${String(m % 60).padStart(2, "0")} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

export function fmt(value, unit) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  switch (unit) {
    case "rate":
      if (value === 0) return "0";
      return value >= 100 ? grouped(Math.round(value)) : grouped(value, value >= 10 ? 1 : 2);
    case "bytes/s":
      return `${bytes(value)}/s`;
    case "duration":
      return duration(value);
    case "count":
      return grouped(Math.round(value));
    default:
      return String(value);
  }
}

function setNumber(node, value, unit, loss) {
  node.textContent = fmt(value, unit);
  node.dataset.value = value === null || value === undefined ? "" : String(value);
  node.classList.toggle("bad", Boolean(loss) && value > 0);
}

function setBadge(node, text, kind) {
  node.textContent = text;
  node.className = `badge badge-${kind}`;
  node.dataset.value = text;
}

function clock(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

// -- header, problems, tiles -----------------------------------------------------------------------

const PIPELINE_KIND = { up: "ok", down: "error", stale: "warn", unknown: "unknown" };

function renderHeader(s) {
  document.title = `${s.problems.some((p) => p.severity === "error") ? "⚠ " : ""}${s.detector} · std-daq`;
  $("detector").textContent = s.detector;
  const [h, w] = s.image_shape;
  const modules = `${s.n_modules} module${s.n_modules === 1 ? "" : "s"}`;
  $("geometry").textContent = `${s.detector_type} · ${modules} · ${h} × ${w} ${s.image_dtype} · ${s.broker} broker`;
  setBadge($("pipeline"), s.stats.pipeline.toUpperCase(), PIPELINE_KIND[s.stats.pipeline] || "unknown");
  $("pipeline").dataset.value = s.stats.pipeline;
  const running = s.processes.filter((p) => p.state === "running").length;
  $("summary").textContent = s.processes.length ? `${running} of ${s.processes.length} processes running` : "";
  $("summary").className = `summary ${running < s.processes.length ? "bad" : ""}`;
  const age = s.stats_age === null ? "no status" : `status ${s.stats_age.toFixed(1)} s old`;
  $("freshness").textContent = age;
  $("freshness").dataset.updated = s.stats.updated === null ? "" : String(s.stats.updated);
  const list = $("problems");
  list.replaceChildren(...s.problems.map((p) => el("li", { class: p.severity, text: p.text })));
  list.hidden = s.problems.length === 0;
}

function renderNumbers(s) {
  for (const node of document.querySelectorAll("[data-key][data-unit]")) {
    setNumber(node, get(s, node.dataset.key), node.dataset.unit, node.hasAttribute("data-loss"));
  }
}

// -- request ---------------------------------------------------------------------------------------

const REQUEST_KIND = { queued: "unknown", running: "info", completed: "ok", interrupted: "warn", failed: "error" };

function renderRequest(r) {
  const panel = $("request-panel");
  panel.classList.toggle("empty", r === null);
  if (r === null) {
    setBadge($("request-state"), "none", "unknown");
    $("request-id").textContent = "";
    $("request-file").textContent = "no write request yet";
    $("request-bar").style.width = "0";
    $("request-progress").textContent = "";
    $("request-message").textContent = "";
    return;
  }
  setBadge($("request-state"), r.state, REQUEST_KIND[r.state] || "unknown");
  $("request-state").dataset.value = r.state;
  $("request-id").textContent = r.request_id.slice(0, 8);
  $("request-id").title = r.request_id;
  $("request-file").textContent = r.output_file || "";
  $("request-file").title = r.output_file || "";
  const pct = r.progress === null ? null : 100 * r.progress;
  const bar = $("request-bar");
  bar.style.width = pct === null ? "100%" : `${pct.toFixed(1)}%`;
  bar.className = `bar bar-${REQUEST_KIND[r.state] || "unknown"}${pct === null ? " open" : ""}`;
  const of = r.n_images === null ? "" : ` / ${grouped(r.n_images)}`;
  $("request-progress").textContent =
    `${grouped(r.n_written)}${of}${pct === null ? "" : `  (${pct.toFixed(1)} %)`}`;
  $("request-message").textContent = r.message || "";
  $("request-message").className = `message ${r.state === "failed" ? "bad" : ""}`;
}

// -- processes and counters ------------------------------------------------------------------------

const MAIN_RATE = { receiver: ["packets", "packets/s"], assembler: ["images", "images/s"],
                    writer: ["images", "images/s"] };
const STATE_KIND = { running: "ok", down: "error", stale: "warn", unknown: "unknown" };

function numberCell(key, value, unit, extra = "") {
  const node = el("span", { class: `num ${extra}`, "data-key": key });
  setNumber(node, value, unit, false);
  return node;
}

function renderProcesses(processes) {
  const rows = processes.map((p) => {
    const [rateKey, rateUnit] = MAIN_RATE[p.role] || [Object.keys(p.rates)[0], "/s"];
    const rate = rateKey && rateKey in p.rates ? p.rates[rateKey] : null;
    const bytesRate = "bytes" in p.rates ? p.rates.bytes : null;
    const base = `processes.${p.name}`;
    return el("tr", { class: `state-${p.state}`, "data-process": p.name, "data-state": p.state,
                      "data-restarts": p.restarts, "data-pid": p.pid ?? "" },
      el("td", {}, el("span", { class: `dot dot-${STATE_KIND[p.state]}`, title: p.state })),
      el("td", { class: "name" }, p.name,
         p.state !== "running" ? el("span", { class: "state-note", text: ` ${p.state}${p.exit_code !== null ? ` (exit ${p.exit_code})` : ""}` }) : null),
      el("td", { class: "mono dim", text: p.pid === null ? "–" : String(p.pid) }),
      el("td", { class: "mono", text: p.uptime === null ? "–" : duration(p.uptime) }),
      el("td", { class: `mono ${p.restarts ? "warn" : "dim"}`, text: String(p.restarts) }),
      el("td", { class: "r" }, numberCell(`${base}.rates.${rateKey}`, rate, "rate"),
         rate === null ? null : el("small", { text: ` ${rateUnit}` })),
      el("td", { class: "r mono", text: bytesRate === null ? "–" : `${bytes(bytesRate)}/s` }),
      el("td", { class: `r mono ${p.warnings ? "warn" : "dim"}`, text: String(p.warnings) }),
      el("td", { class: `r mono ${p.errors ? "bad" : "dim"}`, text: String(p.errors) }),
      el("td", { class: `r mono ${p.stats_age !== null && p.stats_age > 5 ? "warn" : "dim"}`,
                 text: p.stats_age === null ? "–" : `${p.stats_age.toFixed(1)} s` }),
    );
  });
  $("processes").replaceChildren(...rows);
}

const KIND_ORDER = { count: 0, loss: 1, anomaly: 2 };

function renderCounters(processes) {
  const boxes = processes.filter((p) => p.counters.length).map((p) => {
    const counters = [...p.counters].sort((a, b) => KIND_ORDER[a.kind] - KIND_ORDER[b.kind]);
    const rows = counters.map((c) => {
      const value = el("span", { class: "num", "data-key": `processes.${p.name}.counters.${c.key}` });
      setNumber(value, c.value, "count", false);
      const flagged = c.value > 0 && c.kind !== "count";
      return el("div", { class: `counter kind-${c.kind}${flagged ? " flagged" : ""}${c.value === 0 && c.kind !== "count" ? " zero" : ""}`, title: c.key },
        el("span", { class: "label", text: c.label }), value);
    });
    return el("div", { class: "counter-box", "data-process": p.name },
      el("h3", { text: p.name }), ...rows);
  });
  $("counters").replaceChildren(...boxes);
  if (!boxes.length) $("counters").append(el("div", { class: "dim", text: "no process reports counters" }));
}

// -- log -------------------------------------------------------------------------------------------

function renderLogs(lines) {
  latestLogs = lines;
  const important = $("log-important").checked;
  const shown = (important ? lines.filter((l) => ["WARNING", "ERROR", "CRITICAL"].includes(l.level)) : lines)
    .slice().reverse();
  const signature = `${important}|${lines.length}|${lines.length ? lines[lines.length - 1].time : 0}`;
  if (signature === lastLogSignature) return;
  lastLogSignature = signature;
  const rows = shown.map((l) => el("div", { class: `log level-${(l.level || "none").toLowerCase()}` },
    el("span", { class: "t", text: clock(l.time) }),
    el("span", { class: "svc", text: l.service }),
    el("span", { class: "lvl", text: l.level || "" }),
    el("span", { class: "msg", text: l.message, title: l.text })));
  $("logs").replaceChildren(...rows);
  if (!rows.length) $("logs").append(el("div", { class: "dim", text: "no log lines" }));
}

// -- image -----------------------------------------------------------------------------------------

function scaleValue(v) {
  return Number(v.toPrecision(4)).toLocaleString("en-US", { maximumFractionDigits: 3 });
}

const IMAGE_KIND = { 0: "ok", 1: "warn", 2: "error", 3: "error" };

function renderImage(info, png) {
  const img = $("image");
  img.src = `data:image/png;base64,${png}`;
  img.dataset.imageId = String(info.image_id);
  img.dataset.seq = String(info.seq);
  img.dataset.status = String(info.status);
  $("image-empty").hidden = true;
  const missing = info.status === 1 ? `: ${grouped(info.n_missing_packets)} packets` : "";
  setBadge($("image-status"), `${info.status_name}${missing}`, IMAGE_KIND[info.status] || "unknown");
  $("image-status").dataset.value = info.status_name;
  $("image-id").textContent = `image ${info.image_id}`;
  $("vmin").textContent = scaleValue(info.vmin);
  $("vmax").textContent = scaleValue(info.vmax);
  $("colorbar").style.background = `linear-gradient(to right, ${info.colormap.join(", ")})`;
  const shrunk = info.step > 1 ? ` · shown ${info.shown_height} × ${info.shown_width} (max of ${info.step} × ${info.step} px)` : "";
  $("image-meta").textContent =
    `${info.height} × ${info.width} ${info.dtype}${shrunk} · colour scale ${info.scale} · read at ${clock(info.rendered)}`;
}

function renderImageError(s) {
  const shown = $("image").hasAttribute("src");
  if (!shown && s.image_error) {
    $("image-empty").hidden = false;
    $("image-empty").textContent = s.image_error;
  }
  // an image is shown but no newer one can be read: say so instead of passing it off as current
  $("image-error").hidden = !(shown && s.image_error);
  $("image-error").textContent = shown && s.image_error ? `no newer image: ${s.image_error}` : "";
}

// -- the stream ------------------------------------------------------------------------------------

function setConnection(live, viewers) {
  const node = $("connection");
  node.className = `conn ${live ? "conn-live" : "conn-down"}`;
  node.dataset.live = live ? "1" : "0";
  if (live) node.textContent = `● live · ${viewers} viewer${viewers === 1 ? "" : "s"}`;
}

function onSnapshot(event) {
  const s = JSON.parse(event.data);
  lastSnapshotAt = performance.now();
  interval = s.interval;
  renderHeader(s);
  renderNumbers(s);
  renderRequest(s.request);
  renderProcesses(s.processes);
  renderCounters(s.processes);
  renderLogs(s.logs);
  renderImageError(s);
  setConnection(true, s.viewers);
  document.body.dataset.seq = String(s.seq);
}

function onImage(event) {
  const { info, png } = JSON.parse(event.data);
  renderImage(info, png);
}

function watchdog() {
  const silent = (performance.now() - lastSnapshotAt) / 1000;
  if (lastSnapshotAt && silent > 3 * interval + 1) {
    setConnection(false);
    $("connection").textContent = `no data for ${silent.toFixed(0)} s · reconnecting`;
  }
}

function start() {
  const source = new EventSource("ui/events");
  source.addEventListener("snapshot", onSnapshot);
  source.addEventListener("image", onImage);
  source.addEventListener("error", () => {
    setConnection(false);
    $("connection").textContent = "disconnected · reconnecting";
  });
  $("log-important").addEventListener("change", () => { lastLogSignature = ""; renderLogs(latestLogs); });
  setInterval(watchdog, 1000);
}

start();
