// The deployments page (gateway token only): each deployment of the model groups ([models.groups],
// docs/routing.md) with its state, refreshed every few seconds while the page is open.
// Shape (GET /api/deployments, agentspace/routing.py): {deployments: [{id, group, name, model, key, weight,
// strategy, state: "active" | "cooling", coolingUntil, coolingSeconds, inFlight, requestsLastMinute, rpm,
// tokensLastMinute, tpm, latencyMs, recentErrors: [{time, code}]}]}.
import { getJSON } from "./api.js";
import { el } from "./markdown.js";

const REFRESH_MS = 5000;

function limit(used, most) {
  return most ? `${used} / ${most}` : String(used);
}

function stateCell(d) {
  if (d.state === "cooling") {
    return el("td", { class: "error", "data-state": "cooling" },
      `cooling down until ${d.coolingUntil.replace("T", " ").replace("Z", " UTC")} (${Math.ceil(d.coolingSeconds)}s)`);
  }
  return el("td", { "data-state": "active" }, "active");
}

function errorsCell(d) {
  if (!d.recentErrors.length) return el("td", {}, "none");
  const last = d.recentErrors[0];
  return el("td", { title: d.recentErrors.map((e) => `${e.time} ${e.code}`).join("\n") },
    `${d.recentErrors.length} (last: ${last.code} at ${last.time.slice(11, 19)})`);
}

const HEADERS = ["Deployment", "Model", "State", "In flight", "Requests / min", "Tokens / min", "TTFT (avg)", "Recent errors"];

function row(d) {
  const cells = [
    el("td", {}, d.model),
    stateCell(d),
    el("td", { class: "num" }, String(d.inFlight)),
    el("td", { class: "num" }, limit(d.requestsLastMinute, d.rpm)),
    el("td", { class: "num" }, limit(d.tokensLastMinute, d.tpm)),
    el("td", { class: "num" }, d.latencyMs == null ? "–" : `${d.latencyMs} ms`),
    errorsCell(d),
  ];
  // Labelled cells: on a phone each deployment is a card (app.css), its header row hidden.
  cells.forEach((td, i) => td.setAttribute("data-label", HEADERS[i + 1]));
  return el("tr", { "data-deployment": d.id }, el("th", { scope: "row" }, d.id), ...cells);
}

export async function deploymentsPage(main) {
  const list = el("div", { id: "deployments-list", "aria-live": "polite" });
  // A refresh that failed (a restart, a dropped connection) says the states shown are stale; the next goes on.
  const stale = el("p", { id: "deployments-stale", class: "error", role: "status", hidden: true });
  main.replaceChildren(el("h1", {}, "Deployments"),
    el("p", { class: "muted" }, "The deployments of the model groups: which take calls, which are cooling down, and how they answer."),
    stale, list);
  const render = async () => {
    const { deployments } = await getJSON("/api/deployments");
    list.replaceChildren(deployments.length
      ? el("div", { class: "table-wrap" }, el("table", { class: "deployments-table" }, el("caption", {}, "Deployments, now"),
        el("thead", {}, el("tr", {}, ...HEADERS.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...deployments.map(row))))
      : el("p", { class: "muted" }, "No model groups are configured ([models.groups] in the config)."));
  };
  await render();
  const timer = setInterval(() => {
    if (!document.body.contains(list)) return clearInterval(timer); // the page was left
    render().then(() => { stale.hidden = true; }, (e) => {
      stale.textContent = `Could not refresh (${e.message || e}): the states below may be stale; trying again every ${REFRESH_MS / 1000} seconds.`;
      stale.hidden = false;
    });
  }, REFRESH_MS);
}
