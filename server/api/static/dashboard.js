// The capacity dashboard. Every number comes from /v1/capacity and /v1/dashboard/state;
// this file only formats and draws them (no accounting math here).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const QUERY_FIELDS = ["memory_gb", "base", "dtype", "gpu_gb", "kv_cache_gb", "weight_dtype",
                        "r", "unshared_r", "reduce_a", "reduce_b"];
  const COLORS = {
    lora: ["#ffa94d", "#f76707", "#d9480f", "#a61e4d"],
    prolora: ["#4dabf7", "#1f6feb", "#0b3d91"],
    custom: "#8b3dd1",
  };
  const STATE_REFRESH_MS = 2000;
  let lastReport = null;
  let capacitySeq = 0;
  let gib = 2 ** 30;  // replaced by the API's bytes_per_unit

  // --- formatting -------------------------------------------------------------------------
  const fmtInt = (n) => Number(n).toLocaleString("en-US");
  function fmtParams(n) {
    for (const [size, suffix] of [[1e9, "B"], [1e6, "M"], [1e3, "K"]]) {
      if (n >= size) return (n / size).toFixed(2) + suffix;
    }
    return String(n);
  }
  const fmtRatio = (x) => (x === null || x === undefined ? "–" : x.toFixed(2) + "×");

  function fmtBytes(bytes) {
    if (bytes === null || bytes === undefined) return "—";
    const units = [[gib, "GiB", 2], [gib / 1024, "MiB", 1], [gib / 1048576, "KiB", 1]];
    for (const [size, name, digits] of units) {
      if (bytes >= size) return (bytes / size).toFixed(digits) + " " + name;
    }
    return bytes + " B";
  }

  function fmtAgo(seconds) {
    if (seconds < 60) return Math.max(0, Math.round(seconds)) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    return Math.round(seconds / 3600) + " h ago";
  }

  // --- DOM helpers ----------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value !== null && value !== undefined) node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function cell(field, value, text, numeric = true) {
    return el("td", {"data-field": field, "data-value": value, class: numeric ? "num" : null}, text);
  }

  // --- colors -----------------------------------------------------------------------------------
  function rowColors(rows) {
    const seen = {lora: 0, prolora: 0};
    const colors = {};
    for (const row of rows) {
      colors[row.id] = row.custom ? COLORS.custom : COLORS[row.kind][seen[row.kind]++ % COLORS[row.kind].length];
    }
    return colors;
  }

  // --- requests (with the API key when the server wants one) ---------------------------------
  const KEY_STORAGE = "prolora-serve.api-key";

  function adoptKeyFromFragment() {
    // A shared link may carry #key=...; fragments never reach the server or its logs.
    const match = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (!match) return;
    sessionStorage.setItem(KEY_STORAGE, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  async function apiGet(url) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = key ? {Authorization: "Bearer " + key} : {};
    const response = await fetch(url, {headers, cache: "no-store"});
    $("key-form").hidden = response.status !== 401;
    return response;
  }

  function useKey(event) {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    refreshCapacity();
  }

  // --- the capacity request -------------------------------------------------------------------
  function queryString() {
    const params = new URLSearchParams();
    for (const name of QUERY_FIELDS) {
      const value = String($(name).value || "").trim();
      if (value !== "") params.set(name, value);
    }
    return params.toString();
  }

  async function refreshCapacity() {
    const seq = ++capacitySeq;
    let response, body;
    try {
      response = await apiGet("/v1/capacity?" + queryString());
      body = await response.json();
    } catch (err) {
      if (seq === capacitySeq) showError({message: "the server did not answer: " + err});
      return;
    }
    if (seq !== capacitySeq) return;  // a newer request is on its way
    if (!response.ok) return showError(body.error || {message: "request failed"});
    clearError();
    lastReport = body;
    render(body);
  }

  function showError(error) {
    const box = $("form-error");
    box.textContent = error.message;
    box.hidden = false;
    for (const name of QUERY_FIELDS) $(name).removeAttribute("aria-invalid");
    if (error.param && $(error.param)) $(error.param).setAttribute("aria-invalid", "true");
  }

  function clearError() {
    $("form-error").hidden = true;
    for (const name of QUERY_FIELDS) $(name).removeAttribute("aria-invalid");
  }

  // --- selects filled from the API's choices ------------------------------------------------
  function fillSelect(select, values, selected, labels = {}) {
    const current = Array.from(select.options).map((o) => o.value);
    if (current.join("|") !== values.join("|")) {
      select.replaceChildren(...values.map((v) => el("option", {value: v}, labels[v] || v)));
    }
    if (!select.value || !values.includes(select.value)) select.value = selected;
  }

  function syncSelects(report) {
    const choices = report.choices;
    const base = report.base.source === "loaded" ? "loaded" : report.base.name;
    fillSelect($("base"), choices.bases, base, {loaded: "loaded (the served model)"});
    fillSelect($("dtype"), choices.dtypes, report.dtype);
    fillSelect($("weight_dtype"), [""].concat(choices.weight_dtypes), "",
               {"": "auto (nf4 / measured)"});
  }

  // --- rendering --------------------------------------------------------------------------------
  function render(report) {
    gib = report.bytes_per_unit;
    syncSelects(report);
    const colors = rowColors(report.rows);
    renderHeadline(report);
    renderFitChart(report, colors);
    renderBytesChart(report, colors);
    renderTable(report);
    renderGpu(report);
    $("notes").replaceChildren(...report.notes.map((n) => el("li", {}, n)));
  }

  function pairedIds(report) {
    return [report.pairing.prolora, report.pairing.lora];
  }

  function rowById(report, id) {
    return report.rows.find((row) => row.id === id);
  }

  function renderHeadline(report) {
    const pair = report.pairing;
    const prolora = rowById(report, pair.prolora);
    const lora = rowById(report, pair.lora);
    $("pair-prolora-label").textContent = prolora.label;
    $("pair-lora-label").textContent = lora.label;
    $("pair-prolora-fit").textContent = fmtInt(pair.prolora_fit);
    $("pair-lora-fit").textContent = fmtInt(pair.lora_fit);
    $("pair-prolora-params").textContent = fmtParams(pair.prolora_params) + " params · " + fmtBytes(prolora.bytes_per_adapter);
    $("pair-lora-params").textContent = fmtParams(pair.lora_params) + " params · " + fmtBytes(lora.bytes_per_adapter);
    $("pair-ratio").textContent = fmtRatio(pair.fit_ratio);
    $("pair-caption").textContent = `Adapters that fit in ${report.memory_gb} ${report.unit} on ${report.base.name} ` +
      `(${report.dtype}). ${pair.source} (LoRA needs ${pair.params_ratio.toFixed(3)}× the parameters).`;
  }

  function niceStep(span, count) {
    const raw = span / count;
    const power = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  }

  function linearTicks(max, count) {
    const step = niceStep(max || 1, count);
    const ticks = [0];
    while (ticks[ticks.length - 1] < max) ticks.push(ticks.length * step);  // the top tick covers max
    return ticks;
  }

  function chartFrame(report, useLog) {
    const frame = {width: chartWidth($("fit-chart")), height: 300, left: 64, right: 20, top: 18, bottom: 44};
    const xs = report.curve.memory_gb;
    const values = Object.values(report.curve.series).flat();
    const maxY = Math.max(1, ...values);
    frame.xMax = xs[xs.length - 1];
    frame.yTicks = useLog ? logTicks(maxY) : linearTicks(maxY, 5);
    frame.yMax = frame.yTicks[frame.yTicks.length - 1];
    frame.left = 30 + 7 * fmtInt(frame.yMax).length;  // room for the widest tick label
    frame.x = (v) => frame.left + (v / frame.xMax) * (frame.width - frame.left - frame.right);
    const plotH = frame.height - frame.top - frame.bottom;
    frame.y = useLog
      ? (v) => frame.top + plotH * (1 - Math.log10(Math.max(v, 1)) / Math.log10(frame.yMax))
      : (v) => frame.top + plotH * (1 - v / frame.yMax);
    return frame;
  }

  function chartWidth(chart) {
    return Math.max(320, Math.round(chart.getBoundingClientRect().width) || 720);
  }

  function logTicks(max) {
    const ticks = [1];
    while (ticks[ticks.length - 1] < max) ticks.push(ticks[ticks.length - 1] * 10);
    return ticks;
  }

  function drawAxes(chart, frame, report) {
    const bottom = frame.height - frame.bottom;
    for (const v of frame.yTicks) {
      chart.append(svg("line", {class: "grid", x1: frame.left, x2: frame.width - frame.right, y1: frame.y(v), y2: frame.y(v)}));
      chart.append(svg("text", {class: "tick", x: frame.left - 8, y: frame.y(v) + 4, "text-anchor": "end"}, fmtInt(v)));
    }
    for (const v of linearTicks(frame.xMax, 8)) {
      chart.append(svg("text", {class: "tick", x: frame.x(v), y: bottom + 18, "text-anchor": "middle"}, String(+v.toPrecision(6))));
    }
    chart.append(svg("line", {class: "axis", x1: frame.left, x2: frame.width - frame.right, y1: bottom, y2: bottom}));
    chart.append(svg("text", {class: "axis-title", x: (frame.left + frame.width) / 2, y: frame.height - 6, "text-anchor": "middle"},
                     `memory for adapters (${report.unit})`));
    chart.append(svg("text", {class: "axis-title", x: 14, y: frame.top + 110, transform: `rotate(-90 14 ${frame.top + 110})`, "text-anchor": "middle"},
                     "adapters that fit"));
  }

  function seriesPath(frame, xs, ys, useLog) {
    const points = xs.map((x, i) => [x, ys[i]]).filter(([, y]) => !useLog || y >= 1);
    return points.map(([x, y], i) => `${i ? "L" : "M"}${frame.x(x).toFixed(1)},${frame.y(y).toFixed(1)}`).join(" ");
  }

  function renderFitChart(report, colors) {
    const chart = $("fit-chart");
    const useLog = $("log-scale").checked;
    const frame = chartFrame(report, useLog);
    chart.setAttribute("viewBox", `0 0 ${frame.width} ${frame.height}`);
    chart.replaceChildren();
    drawAxes(chart, frame, report);
    const xs = report.curve.memory_gb;
    const emphasis = pairedIds(report).concat(report.rows.filter((row) => row.custom).map((row) => row.id));
    for (const row of report.rows) {
      const strong = emphasis.includes(row.id);
      chart.append(svg("path", {d: seriesPath(frame, xs, report.curve.series[row.id], useLog), fill: "none",
        stroke: colors[row.id], "stroke-width": strong ? 3 : 1.6, opacity: strong ? 1 : 0.55,
        "stroke-dasharray": row.custom ? "6 4" : "none", "data-series": row.id}));
    }
    drawMarker(chart, frame, report, colors);
    chart.append(svg("line", {class: "hover-line", id: "fit-hover", y1: frame.top, y2: frame.height - frame.bottom, visibility: "hidden"}));
    chart.onmousemove = (event) => showCurveTooltip(event, frame, report, colors);
    chart.onmouseleave = hideCurveTooltip;
    $("fit-legend").replaceChildren(...report.rows.map((row) =>
      el("span", {}, el("i", {class: "swatch", style: `background:${colors[row.id]}`}), row.label)));
  }

  function drawMarker(chart, frame, report, colors) {
    const x = frame.x(report.memory_gb);
    chart.append(svg("line", {class: "marker", x1: x, x2: x, y1: frame.top, y2: frame.height - frame.bottom}));
    chart.append(svg("text", {class: "marker-label", x: x + 6, y: frame.top + 12}, `${report.memory_gb} ${report.unit}`));
    for (const row of report.rows) {
      if (useLogHidden(row.fit)) continue;
      chart.append(svg("circle", {cx: x, cy: frame.y(row.fit), r: 3.5, fill: colors[row.id], stroke: "#fff", "stroke-width": 1.2}));
    }
  }

  function useLogHidden(value) {
    return $("log-scale").checked && value < 1;
  }

  function showCurveTooltip(event, frame, report, colors) {
    const chart = $("fit-chart");
    const point = new DOMPoint(event.clientX, event.clientY).matrixTransform(chart.getScreenCTM().inverse());
    const xs = report.curve.memory_gb;
    const fraction = (point.x - frame.left) / (frame.x(frame.xMax) - frame.left);
    const index = Math.min(xs.length - 1, Math.max(0, Math.round(fraction * (xs.length - 1))));
    const hover = $("fit-hover");
    hover.setAttribute("x1", frame.x(xs[index]));
    hover.setAttribute("x2", frame.x(xs[index]));
    hover.setAttribute("visibility", "visible");
    const tip = $("fit-tooltip");
    tip.replaceChildren(el("b", {}, `${+xs[index].toPrecision(6)} ${report.unit}`),
      ...report.rows.map((row) => el("div", {}, el("i", {class: "swatch", style: `background:${colors[row.id]}`}),
        ` ${row.label}: ${fmtInt(report.curve.series[row.id][index])}`)));
    const wrap = chart.parentElement.getBoundingClientRect();
    tip.hidden = false;
    const left = event.clientX - wrap.left + 14;
    tip.style.left = Math.min(left, wrap.width - tip.offsetWidth - 4) + "px";
    tip.style.top = Math.max(0, event.clientY - wrap.top - tip.offsetHeight / 2) + "px";
  }

  function hideCurveTooltip() {
    $("fit-tooltip").hidden = true;
    const hover = $("fit-hover");
    if (hover) hover.setAttribute("visibility", "hidden");
  }

  function renderBytesChart(report, colors) {
    const chart = $("bytes-chart");
    const rows = report.rows;
    const rowH = 44, top = 6, left = 4, right = 160, width = chartWidth(chart);
    chart.setAttribute("viewBox", `0 0 ${width} ${top * 2 + rows.length * rowH}`);
    chart.replaceChildren();
    const max = Math.max(...rows.map((row) => row.bytes_per_adapter));
    rows.forEach((row, i) => {
      const y = top + i * rowH;
      const barW = Math.max(2, (row.bytes_per_adapter / max) * (width - left - right));
      chart.append(svg("text", {class: "bar-name", x: left, y: y + 13}, row.label));
      chart.append(svg("rect", {x: left, y: y + 19, width: barW, height: 18, rx: 4, fill: colors[row.id], "data-bar": row.id}));
      chart.append(svg("text", {class: "bar-label", x: left + barW + 8, y: y + 32},
        `${fmtBytes(row.bytes_per_adapter)} · ${fmtParams(row.params)}`));
    });
  }

  function renderTable(report) {
    const gpu = report.gpu;
    $("th-fit").textContent = `Fit in ${report.memory_gb} ${report.unit}`;
    $("th-fit-gpu").textContent = gpu ? `Fit next to model (${gpu.gpu_gb} ${report.unit} GPU)` : "Fit next to model";
    $("table-caption").textContent = `${report.base.name} · adapter dtype ${report.dtype} (${report.dtype_bytes} B/param)`;
    const pairIds = pairedIds(report);
    const body = $("numbers").tBodies[0];
    body.replaceChildren(...report.rows.map((row) => {
      const classes = [`kind-${row.kind}`, row.custom ? "custom" : "", pairIds.includes(row.id) ? "paired" : ""];
      return el("tr", {"data-row-id": row.id, class: classes.join(" ").trim()},
        cell("label", row.label, row.label, false),
        cell("r", row.r, String(row.r)), cell("unshared_r", row.unshared_r, String(row.unshared_r)),
        cell("reduce_a", row.reduce_a, String(row.reduce_a)), cell("reduce_b", row.reduce_b, String(row.reduce_b)),
        cell("params", row.params, fmtParams(row.params)),
        cell("bytes_per_adapter", row.bytes_per_adapter, fmtBytes(row.bytes_per_adapter)),
        cell("fit", row.fit, fmtInt(row.fit)),
        cell("fit_next_to_model", row.fit_next_to_model ?? "", row.fit_next_to_model === null ? "—" : fmtInt(row.fit_next_to_model)));
    }));
    for (const td of body.querySelectorAll('td[data-field="params"]')) td.title = fmtInt(td.dataset.value) + " parameters";
  }

  function renderGpu(report) {
    const gpu = report.gpu;
    $("gpu-budget").hidden = !gpu;
    if (!gpu) return;
    const total = gpu.gpu_bytes;
    const parts = [["seg-base", "base weights (" + report.base.weight_dtype + ")", gpu.base_weight_bytes],
                   ["seg-kv", "KV cache", gpu.kv_cache_bytes], ["seg-free", "free for adapters", gpu.available_bytes]];
    const used = gpu.base_weight_bytes + gpu.kv_cache_bytes;
    const scale = Math.max(total, used);
    $("gpu-title").textContent = `${gpu.gpu_gb} ${report.unit} accelerator: ` +
      (gpu.fits_base_and_kv ? `${fmtBytes(gpu.available_bytes)} left for adapters`
                            : "the base model and KV cache do not fit");
    $("gpu-stack").replaceChildren(...parts.filter((p) => p[2] > 0).map(([cls, name, bytes]) =>
      el("div", {class: gpu.fits_base_and_kv ? cls : (cls === "seg-free" ? cls : "seg-over"),
                 style: `width:${(100 * bytes / scale).toFixed(2)}%`, title: `${name}: ${fmtBytes(bytes)}`})));
    $("gpu-legend").replaceChildren(...parts.map(([, name, bytes]) => el("span", {}, name + ": ", el("b", {}, fmtBytes(bytes)))));
  }

  // --- live state -------------------------------------------------------------------------------
  function stat(key, value, id, detail = "") {
    return el("div", {class: "stat", "data-stat": id}, el("div", {class: "k"}, key),
              el("div", {class: "v"}, value), el("div", {class: "d"}, detail));
  }

  function renderStats(state) {
    const cache = state.adapter_cache;
    const kv = state.kv_cache;
    const sched = state.scheduler;
    const counters = state.counters;
    const blocks = kv && kv.kv_blocks_total !== null ? `${fmtInt(kv.kv_blocks_used)} of ${fmtInt(kv.kv_blocks_total)} blocks in use` : "";
    const kernels = state.backends;
    $("live-stats").replaceChildren(
      stat("Base model weights", fmtBytes(state.base_model_bytes), "base_model_bytes"),
      stat("Kernels", kernels ? `${kernels.adapter} · ${kernels.decode_attention}` : "—", "backends",
           "adapter apply · decode attention"),
      stat("KV cache", kv ? fmtBytes(kv.kv_cache_bytes) : "—", "kv_cache", blocks),
      stat("Adapter cache", cache ? fmtBytes(cache.used_bytes) : "—", "adapter_cache",
           cache ? `of ${fmtBytes(cache.budget_bytes)} budget` : ""),
      stat("Prefix cache", state.prefix_cache ? `${fmtInt(state.prefix_cache.hits)} / ${fmtInt(state.prefix_cache.misses)}` : "—",
           "prefix_cache", kv && kv.kv_blocks_cached !== undefined ? `block hits / misses · ${fmtInt(kv.kv_blocks_cached)} blocks cached` : ""),
      stat("Hit rate", cache && cache.hit_rate !== null ? (100 * cache.hit_rate).toFixed(1) + "%" : "—", "hit_rate"),
      stat("Hits / misses", cache ? `${fmtInt(cache.hits)} / ${fmtInt(cache.misses)}` : "—", "hits_misses"),
      stat("Loads / evictions", cache ? `${fmtInt(cache.loads)} / ${fmtInt(cache.evictions)}` : "—", "loads_evictions"),
      stat("Running / waiting", sched ? `${fmtInt(sched.num_running ?? 0)} / ${fmtInt(sched.num_waiting ?? 0)}` : "—", "running_waiting"),
      stat("Last batch", sched && sched.last_batch_size !== null ? fmtInt(sched.last_batch_size) : "—", "last_batch",
           sched && sched.last_batch_tokens !== null ? `sequences · ${fmtInt(sched.last_batch_tokens)} token rows` : ""),
      stat("Requests finished", counters && counters.num_finished !== null ? fmtInt(counters.num_finished) : "—", "num_finished"),
      stat("Generated tokens", counters && counters.generated_tokens !== null ? fmtInt(counters.generated_tokens) : "—", "generated_tokens"),
      stat("Registered adapters", state.num_registered === null ? "—" : fmtInt(state.num_registered), "num_registered"));
    $("cache-bar").hidden = !cache;
    if (cache) $("cache-bar-fill").style.width = `${cache.budget_bytes ? (100 * cache.used_bytes / cache.budget_bytes).toFixed(1) : 0}%`;
  }

  function adapterRows(body, entries, columns, emptyText, limit = 200, total = entries.length) {
    if (!entries.length) {
      body.replaceChildren(el("tr", {}, el("td", {class: "empty", colspan: columns.length + 2}, emptyText)));
      return;
    }
    const rows = entries.slice(0, limit).map((a) => el("tr", {"data-adapter-id": a.id},
      el("td", {}, a.id), el("td", {}, a.label), ...columns.map((col) => col(a))));
    const shown = Math.min(entries.length, limit);
    if (total > shown) rows.push(el("tr", {}, el("td", {class: "empty", colspan: columns.length + 2}, `+${total - shown} more`)));
    body.replaceChildren(...rows);
  }

  // Scale-out (serve --replicas N): one row per engine replica; hidden for one engine in process.
  function renderReplicas(state) {
    const replicas = state.replicas || [];
    $("replicas").hidden = !replicas.length;
    $("replica-count").textContent = replicas.length;
    $("replica-table").tBodies[0].replaceChildren(...replicas.map((r) => el("tr", {"data-replica-id": r.id},
      el("td", {}, r.id),
      el("td", {class: "num"}, `${fmtInt(r.scheduler.num_running)} / ${fmtInt(r.scheduler.num_waiting)}`),
      el("td", {class: "num"}, `${fmtInt(r.kv_cache.kv_blocks_used)} of ${fmtInt(r.kv_cache.kv_blocks_total)}`),
      el("td", {class: "num"}, r.adapter_cache ? `${fmtBytes(r.adapter_cache.used_bytes)} of ${fmtBytes(r.adapter_cache.budget_bytes)}` : "—"),
      el("td", {class: "num"}, r.adapter_cache ? fmtInt(r.adapter_cache.loads) : "—"),
      el("td", {}, r.resident.length ? r.resident.join(", ") : "none"))));
  }

  function renderState(state) {
    const pill = $("engine-pill");
    pill.dataset.state = state.engine_running ? "running" : "idle";
    pill.textContent = state.engine_running ? `serving ${state.model}` : "no engine attached";
    renderStats(state);
    renderReplicas(state);
    $("resident-count").textContent = state.resident.length;
    $("cold-count").textContent = state.num_cold ?? state.cold.length;
    adapterRows($("resident").tBodies[0], state.resident, [
      (a) => el("td", {class: "num", "data-value": a.nbytes}, fmtBytes(a.nbytes)),
      (a) => el("td", {class: "num"}, fmtAgo(state.time - a.last_used)),
      (a) => el("td", {class: "num"}, String(a.in_use))], state.engine_running ? "none resident yet" : "no engine attached");
    adapterRows($("cold").tBodies[0], state.cold, [
      (a) => el("td", {class: "num", "data-value": a.nbytes}, fmtBytes(a.nbytes))], "none", 200,
      state.num_cold ?? state.cold.length);
    $("live-updated").textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();
  }

  async function refreshState() {
    try {
      const response = await apiGet("/v1/dashboard/state");
      if (!response.ok) throw new Error("HTTP " + response.status);
      renderState(await response.json());
    } catch (err) {
      $("engine-pill").dataset.state = "offline";
      $("engine-pill").textContent = "server unreachable";
    } finally {
      setTimeout(refreshState, STATE_REFRESH_MS);
    }
  }

  // --- wiring -------------------------------------------------------------------------------------
  function debounce(fn, ms) {
    let timer = null;
    return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
  }

  adoptKeyFromFragment();
  $("key-form").addEventListener("submit", useKey);
  const scheduleCapacity = debounce(refreshCapacity, 150);
  window.addEventListener("resize", debounce(() => lastReport && render(lastReport), 200));
  $("controls").addEventListener("input", scheduleCapacity);
  $("controls").addEventListener("change", scheduleCapacity);
  $("log-scale").addEventListener("change", () => lastReport && renderFitChart(lastReport, rowColors(lastReport.rows)));
  refreshCapacity();
  refreshState();
})();
