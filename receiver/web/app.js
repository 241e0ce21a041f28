// DataLab dashboard: a street map drawn as SVG from the API's GeoJSON, and the fleet table.
// No map library: the page must work on a machine without internet. Under the data it draws
// either raster tiles from the one tile server the centre configured (serve --tile-url; the
// server's Content-Security-Policy admits that origin and no other) or, by default and offline,
// the street lines the map units are cut from (/api/v1/basemap).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const VIEW_W = 1000, VIEW_H = 640, PAD = 20;

// Class breaks per quantity (upper bounds). PM after the WHO 2021 guideline levels
// (PM2.5 5 annual / 15 daily, PM10 15 / 45 µg/m³); NO2 in ppb (WHO annual 10 µg/m³ ≈ 5 ppb);
// noise after the Dutch/EU Lden bands used in noise maps.
const BREAKS = {
  pm25: [5, 10, 15, 20, 25, 35],
  pm10: [15, 20, 30, 45, 60, 80],
  no2_ppb: [5, 10, 15, 20, 30, 40],
  laeq: [50, 55, 60, 65, 70, 75],
  // The sound module set to C or Z weighting: no noise-map band is defined for these (traffic
  // reads several dB higher in C and Z than in A), so the A bands would paint streets too loud.
  // They get 5 dB steps on a neutral grey scale, with a note in the legend.
  lceq: [55, 60, 65, 70, 75, 80],
  lzeq: [55, 60, 65, 70, 75, 80],
};
const COLOURS = ["#1a9850", "#91cf60", "#d9ef8b", "#fee08b", "#fc8d59", "#d73027", "#7b0a3c"];
const NEUTRAL = ["#f0f0f0", "#d0d0d0", "#b0b0b0", "#909090", "#707070", "#505050", "#303030"];
const NEUTRAL_NOTE = {
  lceq: "C-weighted: grey steps of 5 dB, not a health band (the A-weighted bands do not apply)",
  lzeq: "Z-weighted (unweighted): grey steps of 5 dB, not a health band (the A-weighted bands do not apply)",
};

function paletteFor(quantity) { return NEUTRAL_NOTE[quantity] ? NEUTRAL : COLOURS; }

const state = { catalog: null, token: "", view: null, project: null };

function $(id) { return document.getElementById(id); }

function colourFor(quantity, value) {
  const b = BREAKS[quantity] || [], colours = paletteFor(quantity);
  for (let i = 0; i < b.length; i++) if (value < b[i]) return colours[i];
  return colours[b.length];
}

async function getJSON(url, headers) {
  const r = await fetch(url, { headers: headers || {}, cache: "no-store" });
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return r.json();
}

function option(select, value, text, selected) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text; if (selected) o.selected = true;
  select.appendChild(o);
}

// ---------------------------------------------------------------- the map

// Web Mercator y, so shapes look right at this latitude; fitted into the view box.
function mercY(lat) { const r = lat * Math.PI / 180; return Math.log(Math.tan(Math.PI / 4 + r / 2)) * 180 / Math.PI; }

function eachCoord(geom, fn) {
  const walk = (c) => { if (typeof c[0] === "number") fn(c[0], c[1]); else c.forEach(walk); };
  walk(geom.coordinates);
}

function makeProjection(features) {
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, lat0 = Infinity, lat1 = -Infinity;
  features.forEach((f) => eachCoord(f.geometry, (lon, lat) => {
    const y = mercY(lat);
    x0 = Math.min(x0, lon); x1 = Math.max(x1, lon); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
    lat0 = Math.min(lat0, lat); lat1 = Math.max(lat1, lat);
  }));
  const s = Math.min((VIEW_W - 2 * PAD) / ((x1 - x0) || 1e-6), (VIEW_H - 2 * PAD) / ((y1 - y0) || 1e-6));
  const ox = (VIEW_W - s * (x1 - x0)) / 2, oy = (VIEW_H - s * (y1 - y0)) / 2;
  const fromMerc = (lon, m) => [ox + s * (lon - x0), VIEW_H - (oy + s * (m - y0))];
  const project = (lon, lat) => fromMerc(lon, mercY(lat));
  project.fromMerc = fromMerc;
  project.scale = s;  // view units per degree of longitude
  // Longitude and Mercator y (in degrees) of a view-box point: which tiles cover the view.
  project.invert = (x, y) => [x0 + (x - ox) / s, y0 + (VIEW_H - y - oy) / s];
  project.dataBox = [x0, lat0, x1, lat1];  // west, south, east, north
  return project;
}

function pathData(geom, project) {
  const ring = (pts, close) => pts.map((c, i) => {
    const [x, y] = project(c[0], c[1]);
    return (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
  }).join("") + (close ? "Z" : "");
  switch (geom.type) {
    case "LineString": return ring(geom.coordinates, false);
    case "MultiLineString": return geom.coordinates.map((l) => ring(l, false)).join("");
    case "Polygon": return geom.coordinates.map((r) => ring(r, true)).join("");
    case "MultiPolygon": return geom.coordinates.map((p) => p.map((r) => ring(r, true)).join("")).join("");
    default: return "";
  }
}

function fmt(v, digits) { return v == null ? "–" : Number(v).toFixed(digits); }

function drawMap(fc, quantity) {
  const g = $("units");
  g.replaceChildren();
  const feats = fc.features.filter((f) => f.geometry);
  if (!feats.length) { drawLegend(quantity); return 0; }
  const project = makeProjection(feats);
  const unit = (state.catalog.quantities[quantity] || {}).unit || "";
  for (const f of feats) {
    const p = f.properties;
    const el = document.createElementNS(SVG_NS, "path");
    const line = f.geometry.type.indexOf("LineString") >= 0;
    el.setAttribute("d", pathData(f.geometry, project));
    el.setAttribute("class", "unit " + (line ? "line" : "cell"));
    const colour = colourFor(quantity, p.value);
    el.setAttribute(line ? "stroke" : "fill", colour);
    el.dataset.cell = p.cell;
    el.dataset.value = p.value;
    el.dataset.passes = p.n_passes;
    el.dataset.days = p.n_days;
    // Values the flag policy left out (docs/datalab.md, "Flag policy"); absent in maps built before it.
    el.dataset.excluded = p.n_excluded == null ? "" : p.n_excluded;
    el.dataset.text = (p.street ? p.street + " · " : "") + p.cell + ": " + fmt(p.value, 1) + " " + unit +
      " (" + p.n_passes + " passes on " + p.n_days + " days" +
      (p.n_excluded == null ? "" : ", " + p.n_excluded + " flagged values left out") + ")";
    g.appendChild(el);
  }
  drawLegend(quantity);
  state.project = project;
  return feats.length;
}

// ---------------------------------------------------------------- under the data

async function drawBasemap(project) {
  const layer = $("basemap"), svg = $("map"), credit = $("attribution");
  layer.replaceChildren();
  // The whole view box, in degrees: streets (or tiles) reach its edges, around the data.
  const [w, mN] = project.invert(-VIEW_W * 0.25, -VIEW_H * 0.25);
  const [e, mS] = project.invert(VIEW_W * 1.25, VIEW_H * 1.25);
  const lat = (m) => Math.atan(Math.sinh(m * Math.PI / 180)) * 180 / Math.PI;
  const bbox = [w, lat(mS), e, lat(mN)].map((v) => v.toFixed(5)).join(",");
  let bm;
  try {
    bm = await getJSON("../api/v1/basemap?bbox=" + bbox);
  } catch (e) {
    svg.dataset.basemap = "none"; credit.textContent = ""; return;
  }
  if (bm.tile_url) {
    const n = drawTiles(layer, bm.tile_url, project, w, e, mS, mN);
    svg.dataset.basemap = "tiles"; svg.dataset.basemapItems = String(n);
    credit.textContent = bm.attribution || "";
  } else {
    for (const f of bm.streets.features) {
      const el = document.createElementNS(SVG_NS, "path");
      el.setAttribute("d", pathData(f.geometry, project));
      el.setAttribute("class", "street " + (f.properties.road_class || ""));
      layer.appendChild(el);
    }
    svg.dataset.basemap = "streets"; svg.dataset.basemapItems = String(bm.streets.features.length);
    credit.textContent = "Streets: the road network of the map units (offline basemap).";
  }
}

// Web Mercator raster tiles (z/x/y) covering lon w..e and Mercator y mS..mN, at the zoom whose
// tiles show at about 256 screen pixels. At most 64 tiles: a wider view takes a coarser zoom.
function drawTiles(layer, template, project, w, e, mS, mN) {
  const px = $("map").clientWidth / VIEW_W || 1;
  let z = Math.round(Math.log2(360 * project.scale * px / 256));
  z = Math.max(0, Math.min(19, z));
  const tile = (lon, m, zz) => [Math.floor((lon + 180) / 360 * 2 ** zz), Math.floor((1 - m / 180) / 2 * 2 ** zz)];
  let a, b;
  for (;; z--) {
    a = tile(w, mN, z); b = tile(e, mS, z);
    if (z === 0 || (b[0] - a[0] + 1) * (b[1] - a[1] + 1) <= 64) break;
  }
  const n2 = 2 ** z;
  let count = 0;
  for (let tx = Math.max(a[0], 0); tx <= Math.min(b[0], n2 - 1); tx++) {
    for (let ty = Math.max(a[1], 0); ty <= Math.min(b[1], n2 - 1); ty++) {
      const [x, y] = project.fromMerc(tx / n2 * 360 - 180, 180 * (1 - 2 * ty / n2));
      const [x2, y2] = project.fromMerc((tx + 1) / n2 * 360 - 180, 180 * (1 - 2 * (ty + 1) / n2));
      const img = document.createElementNS(SVG_NS, "image");
      img.setAttribute("href", template.replace("{z}", z).replace("{x}", tx).replace("{y}", ty));
      img.setAttribute("x", x.toFixed(1)); img.setAttribute("y", y.toFixed(1));
      img.setAttribute("width", (x2 - x).toFixed(1)); img.setAttribute("height", (y2 - y).toFixed(1));
      img.setAttribute("preserveAspectRatio", "none");
      img.setAttribute("class", "tile");
      layer.appendChild(img);
      count++;
    }
  }
  return count;
}

// Where the parts ended up on screen: the tests read it (legend off the data, table in the page).
function layoutReport() {
  const r = (el) => { const b = el.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom].map(Math.round); };
  return JSON.stringify({
    viewport: [window.innerWidth, window.innerHeight],
    page_width: document.documentElement.scrollWidth,
    map: r($("map")), data: r($("units")), legend: r($("legend")),
    table: r($("fleet-table")), fleet: r($("fleet-section")),
  });
}

function drawLegend(quantity) {
  const legend = $("legend");
  legend.replaceChildren();
  const q = state.catalog.quantities[quantity] || { label: quantity, unit: "" };
  const title = document.createElement("div");
  title.textContent = q.label + " (" + q.unit + ")";
  legend.appendChild(title);
  if (NEUTRAL_NOTE[quantity]) {
    const note = document.createElement("div"); note.className = "note";
    note.textContent = NEUTRAL_NOTE[quantity];
    legend.appendChild(note);
  }
  const b = BREAKS[quantity] || [], colours = paletteFor(quantity);
  for (let i = 0; i <= b.length; i++) {
    const row = document.createElement("div"); row.className = "row";
    const sw = document.createElement("span"); sw.className = "sw"; sw.style.background = colours[i];
    const t = document.createElement("span");
    t.textContent = i === 0 ? "< " + b[0] : i === b.length ? "≥ " + b[b.length - 1] : b[i - 1] + " – " + b[i];
    row.append(sw, t); legend.appendChild(row);
  }
}

function setupPanZoom() {
  const svg = $("map");
  state.view = { x: 0, y: 0, w: VIEW_W, h: VIEW_H };
  const apply = () => svg.setAttribute("viewBox", [state.view.x, state.view.y, state.view.w, state.view.h].join(" "));
  const toView = (ev) => {
    const r = svg.getBoundingClientRect();
    return [state.view.x + (ev.clientX - r.left) / r.width * state.view.w,
            state.view.y + (ev.clientY - r.top) / r.height * state.view.h];
  };
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [px, py] = toView(ev);
    const k = ev.deltaY < 0 ? 0.8 : 1.25;
    const v = state.view;
    const w = Math.min(Math.max(v.w * k, 20), VIEW_W * 4);
    const f = w / v.w;
    state.view = { x: px - (px - v.x) * f, y: py - (py - v.y) * f, w: w, h: v.h * f };
    apply();
  }, { passive: false });
  let drag = null;
  svg.addEventListener("pointerdown", (ev) => { drag = { cx: ev.clientX, cy: ev.clientY, v: { ...state.view } }; });
  window.addEventListener("pointerup", () => { drag = null; });
  svg.addEventListener("pointermove", (ev) => {
    const tip = $("tooltip");
    if (drag) {
      const r = svg.getBoundingClientRect();
      state.view = { ...drag.v, x: drag.v.x - (ev.clientX - drag.cx) / r.width * drag.v.w,
                     y: drag.v.y - (ev.clientY - drag.cy) / r.height * drag.v.h };
      apply();
    }
    const t = ev.target;
    if (t.classList && t.classList.contains("unit")) {
      const wrap = svg.parentElement.getBoundingClientRect();
      tip.textContent = t.dataset.text;
      tip.style.left = (ev.clientX - wrap.left + 12) + "px";
      tip.style.top = (ev.clientY - wrap.top + 12) + "px";
      tip.hidden = false;
    } else {
      tip.hidden = true;
    }
  });
  svg.addEventListener("pointerleave", () => { $("tooltip").hidden = true; });
}

function fillSelectors() {
  const pub = state.catalog.published;
  const params = new URLSearchParams(location.search);
  const qSel = $("quantity"), pSel = $("period"), sSel = $("scheme");
  const quantities = Object.keys(state.catalog.quantities);
  const wantQ = params.get("quantity") || "pm25";
  quantities.forEach((k) => option(qSel, k, state.catalog.quantities[k].label, k === wantQ));
  const schemes = [...new Set(pub.map((r) => r.scheme))];
  const wantS = params.get("scheme") || (schemes.includes("segment") ? "segment" : schemes[0]);
  schemes.forEach((s) => option(sSel, s, s === "segment" ? "road segments (~30 m)" : "H3 cells (" + s + ")", s === wantS));
  const periods = [...new Set(pub.map((r) => r.period))].sort((a, b) => (a === "all" ? -1 : b === "all" ? 1 : b.localeCompare(a)));
  const wantP = params.get("period") || (periods.includes("all") ? "all" : periods[0]);
  periods.forEach((p) => option(pSel, p, p === "all" ? "all data" : p, p === wantP));
}

async function refreshMap() {
  const quantity = $("quantity").value, period = $("period").value, scheme = $("scheme").value;
  const status = $("map-status");
  if (!scheme || !period) { status.textContent = "nothing published yet"; $("units").replaceChildren(); return; }
  status.textContent = "loading...";
  const qs = new URLSearchParams({ quantity, period, scheme, format: "geojson" });
  try {
    const fc = await getJSON("../api/v1/aggregates?" + qs);
    const n = drawMap(fc, quantity);
    if (n) await drawBasemap(state.project);
    const what = scheme === "segment" ? "segments" : "cells";
    status.textContent = n + " " + what + " drawn";
    $("map").dataset.drawn = String(n);
  } catch (e) {
    status.textContent = "map unavailable: " + e.message;
  }
}

// ---------------------------------------------------------------- the fleet

function age(s) {
  if (s == null) return "–";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function bytes(b) {
  if (b == null) return "–";
  const u = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (b >= 1000 && i < u.length - 1) { b /= 1000; i++; }
  return b.toFixed(i ? 1 : 0) + " " + u[i];
}

function cell(tr, text, cls) {
  const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td;
}

async function refreshFleet() {
  const status = $("fleet-status"), body = document.querySelector("#fleet-table tbody");
  if (!state.token) { status.textContent = "enter the token to see the fleet"; return; }
  status.textContent = "loading...";
  try {
    const data = await getJSON("../api/v1/fleet", { Authorization: "Bearer " + state.token });
    body.replaceChildren();
    for (const v of data.vans) {
      const tr = document.createElement("tr");
      tr.dataset.device = v.device;
      cell(tr, v.device);
      const lc = cell(tr, v.last_contact_utc ? age(v.last_contact_age_s) + " ago" : "never");
      if (v.last_contact_utc) lc.title = v.last_contact_utc;
      cell(tr, v.online == null ? "?" : v.online ? "online" : "offline", v.online ? "ok" : "bad");
      cell(tr, v.backlog_samples == null ? "–" : v.backlog_samples.toLocaleString("en"), "num");
      cell(tr, age(v.oldest_unsent_age_s), "num");
      const errs = Object.entries(v.sensor_errors || {}).filter(([, n]) => n);
      cell(tr, errs.length ? errs.map(([k, n]) => k + ": " + n).join(", ") : v.sensor_health === "ok" ? "ok" : "unknown",
        errs.length ? "warn" : v.sensor_health === "ok" ? "ok" : "");
      cell(tr, v.cpu_temp_c == null ? "–" : v.cpu_temp_c.toFixed(0) + " °C", "num");
      cell(tr, bytes(v.disk_free_bytes), "num");
      cell(tr, v.samples_stored == null ? "–" : v.samples_stored.toLocaleString("en"), "num");
      body.appendChild(tr);
    }
    status.textContent = data.vans.length + " vans, as of " + data.generated_utc;
  } catch (e) {
    body.replaceChildren();
    status.textContent = e.status === 401 ? "wrong token" : "fleet unavailable: " + e.message;
  }
}

// ---------------------------------------------------------------- start

async function main() {
  // A token may come in the URL fragment (#token=...): fragments never reach the server or its logs.
  const frag = new URLSearchParams(location.hash.slice(1));
  if (frag.get("token")) {
    sessionStorage.setItem("datalab-token", frag.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  state.token = sessionStorage.getItem("datalab-token") || "";
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("datalab-token", state.token);
    refreshFleet();
  });
  setupPanZoom();
  try {
    state.catalog = await getJSON("../api/v1/catalog");
  } catch (e) {
    $("map-status").textContent = "catalog unavailable: " + e.message;
    return;
  }
  fillSelectors();
  ["quantity", "period", "scheme"].forEach((id) => $(id).addEventListener("change", refreshMap));
  await Promise.all([refreshMap(), refreshFleet()]);
  document.body.dataset.layout = layoutReport();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", main);
