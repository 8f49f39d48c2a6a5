// The gateway's status page: polls the admin API's JSON and draws every route, its split,
// canary, shadow agreement and endpoint health. No build step, no dependencies.
"use strict";

const REFRESH_SECONDS = 2;
const TOKEN_KEY = "gateway-admin-token";
const $ = (id) => document.getElementById(id);

// --- small DOM helpers (text only: nothing from the API is parsed as HTML) ---------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value; // CSSOM: allowed by the page's CSP
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function pct(value, digits = 1) {
  return typeof value === "number" ? `${(value * 100).toFixed(digits)} %` : "–";
}

function weightText(value) {
  // 0.25 -> "25 %", 0.125 -> "12.5 %"
  if (typeof value !== "number") return "–";
  const shown = Math.round(value * 10000) / 100;
  return `${shown} %`;
}

function seconds(value) {
  if (typeof value !== "number") return "–";
  if (value < 60) return `${value < 10 ? value.toFixed(1) : Math.round(value)} s`;
  const whole = Math.round(value);
  return `${Math.floor(whole / 60)} min ${whole % 60} s`;
}

function dl(rows) {
  return el("dl", {}, rows.filter(Boolean).flatMap(([term, ...value]) =>
    [el("dt", {}, term), el("dd", {}, ...value)]));
}

// --- the admin API -----------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(`api/v1/${path}`, { headers, cache: "no-store" });
  if (response.status === 401) throw new Unauthorized();
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    throw new Error(`${path}: ${response.status} ${response.statusText}`);
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new Error(`${path}: ${response.status} ${message}`);
  }
  return body;
}

async function load() {
  const data = await api("routes");
  // The route list has each canary's summary; its steps and last decision are in the
  // canary's own view. A canary view that fails (the state store is down) is shown as such.
  const canaries = await Promise.all(data.routes.map((route) =>
    route.canary
      ? api(`routes/${encodeURIComponent(route.name)}/canary`).catch((error) => {
        if (error instanceof Unauthorized) throw error;
        return { error: error.message };
      })
      : null));
  return { data, canaries };
}

// --- drawing -----------------------------------------------------------------------------

function splitSection(route) {
  const weight = route.challenger_weight;
  const challengerShare = route.challenger ? weight : 0;
  return [
    el("h3", {}, "Split"),
    el("div", { class: "split", title: `challenger ${weightText(challengerShare)}` },
      el("div", { class: "champion", style: `width: ${(1 - challengerShare) * 100}%` }),
      el("div", { class: "challenger", style: `width: ${challengerShare * 100}%` })),
    dl([
      ["champion", el("span", { class: "swatch", style: "background: var(--champion)" }),
        el("code", {}, route.champion), ` ${weightText(1 - challengerShare)}`],
      ["challenger", route.challenger
        ? [el("span", { class: "swatch", style: "background: var(--challenger)" }),
          el("code", {}, route.challenger),
          el("span", { "data-field": "weight" }, ` ${weightText(weight)}`)]
        : el("span", { class: "muted" }, "none")],
      ["split key", el("code", {}, route.split ? route.split.key : "–")],
    ]),
  ];
}

function stepOf(view) {
  const n = (view.steps || []).length;
  return typeof view.step === "number" && view.step >= 0
    ? `step ${view.step + 1} of ${n}` : `no step yet (${n} steps)`;
}

function canarySection(route, view) {
  if (!route.canary) return null;
  const summary = route.canary;
  const head = el("h3", {}, "Canary");
  if (!view || view.error) {
    return [head, dl([
      ["state", el("span", { class: `badge state-${summary.state}` }, summary.state)],
      ["weight", weightText(summary.weight)],
      ["reason", summary.reason || "–"],
      view && view.error ? ["details", el("span", { class: "unhealthy" }, view.error)] : null,
    ])];
  }
  const steps = view.steps || [];
  const decision = view.last_decision;
  return [
    head,
    dl([
      ["state", el("span", { class: `badge state-${view.state}`, "data-field": "canary-state" },
        view.state)],
      ["progress", el("span", { "data-field": "canary-step" }, stepOf(view)),
        ` · weight ${weightText(view.weight)}`,
        view.step_elapsed !== null && view.step_elapsed !== undefined
          ? ` · this step ${seconds(view.step_elapsed)}` : ""],
      ["steps", el("div", { class: "steps" }, steps.map((w, i) => el("span", {
        class: i === view.step ? "current" : i < view.step ? "done" : "",
      }, weightText(w))))],
      ["reason", view.reason || "–"],
      ["last decision", decision
        ? el("span", { "data-field": "canary-decision" },
          el("strong", {}, decision.action), ` (${decision.reason})`,
          decision.message ? `: ${decision.message}` : "")
        : el("span", { class: "muted" }, "none yet")],
    ]),
  ];
}

function shadowSection(route) {
  const shadow = route.shadow;
  if (!shadow) return null;
  const o = shadow.outcomes || {};
  const compared = (o.match || 0) + (o.mismatch || 0);
  const failed = (o.error || 0) + (o.timeout || 0) + (o.dropped || 0);
  return [
    el("h3", {}, "Shadow"),
    dl([
      ["target", el("code", {}, shadow.target), ` · ${pct(shadow.sample_rate, 0)} sampled`],
      ["agreement", el("span", { "data-field": "agreement" },
        compared ? `${pct(shadow.agreement_rate)} (${o.match || 0} of ${compared} agree)`
          : "nothing compared yet")],
      failed ? ["not compared", `${o.error || 0} errors, ${o.timeout || 0} timeouts, ` +
        `${o.dropped || 0} dropped`] : null,
    ]),
  ];
}

// Endpoint health, wherever the route view has it: any list of objects with a "url" and a
// boolean "healthy", named by the nearest key above it that is a backend's name.
function findEndpoints(value, name, found) {
  if (Array.isArray(value)) {
    if (value.length && value.every((e) => e && typeof e === "object" &&
        typeof e.url === "string" && typeof e.healthy === "boolean")) {
      found.push([name, value]);
    } else {
      value.forEach((item) => findEndpoints(item, name, found));
    }
  } else if (value && typeof value === "object") {
    for (const [key, inner] of Object.entries(value)) {
      if (key === "shadow" || key === "canary" || key === "split" || key === "match") continue;
      const named = ["endpoints", "health", "backends"].includes(key)
        ? (typeof value.name === "string" ? value.name : name) : key;
      findEndpoints(inner, named, found);
    }
  }
  return found;
}

function endpointSection(route) {
  const groups = findEndpoints(route, route.name, []);
  if (!groups.length) return null;
  return [
    el("h3", {}, "Endpoints"),
    dl(groups.map(([backend, endpoints]) => [
      el("code", {}, backend),
      el("ul", { class: "endpoints" }, endpoints.map((e) => el("li", {},
        el("span", { class: e.healthy ? "healthy" : "unhealthy" },
          e.healthy ? "● healthy" : "○ out of rotation"),
        " ", el("code", {}, e.url),
        !e.healthy && e.reason ? ` (${e.reason}` +
          (typeof e.ejected_for_seconds === "number"
            ? `, back in ${seconds(e.ejected_for_seconds)})` : ")") : ""))),
    ])),
  ];
}

function routeCard(route, canaryView) {
  const match = route.match || {};
  return el("section", { class: "route", "data-route": route.name },
    el("div", { class: "route-head" },
      el("h2", {}, route.name),
      el("code", { class: "muted" }, match.path_prefix || ""),
      match.model ? el("span", { class: "muted" }, `model ${match.model}`) : null),
    el("div", { class: "grid" },
      el("div", {}, splitSection(route), endpointSection(route)),
      el("div", {}, canarySection(route, canaryView), shadowSection(route))));
}

function draw({ data, canaries }) {
  const routes = data.routes;
  const state = data.state || {};
  $("summary").textContent =
    `${routes.length} ${routes.length === 1 ? "route" : "routes"}` +
    ` · state store: ${state.backend || "?"} ${state.status || "?"}`;
  $("routes").replaceChildren(...routes.map((route, i) => routeCard(route, canaries[i])));
}

// --- the loop ------------------------------------------------------------------------------

function showProblem(message) {
  $("problem").textContent = message;
  $("problem").hidden = !message;
}

function askForToken(wrong) {
  $("routes").replaceChildren();
  $("summary").textContent = "the admin API needs a token";
  $("token-form").hidden = false;
  showProblem(wrong ? "That token was refused." : "");
  $("token").focus();
}

let timer = null;

async function refresh() {
  clearTimeout(timer);
  try {
    const loaded = await load();
    $("token-form").hidden = true;
    showProblem("");
    draw(loaded);
    $("updated").textContent =
      `updated ${new Date().toLocaleTimeString()}, every ${REFRESH_SECONDS} s`;
    $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  } catch (error) {
    if (error instanceof Unauthorized) {
      askForToken(Boolean(sessionStorage.getItem(TOKEN_KEY)));
      return; // no polling until a token is given
    }
    showProblem(`Cannot read the admin API (${error.message}); retrying.`);
  }
  timer = setTimeout(refresh, REFRESH_SECONDS * 1000);
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  refresh();
});

$("forget-token").addEventListener("click", (event) => {
  event.preventDefault();
  sessionStorage.removeItem(TOKEN_KEY);
  refresh();
});

refresh();
