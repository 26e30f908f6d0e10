// The clients page (gateway token only): client keys with spend against budget; create (the key is shown
// once), edit budget and limits, rotate, remove. Shown only when the gateway has /api/clients.
// Shapes (agentspace/transports/clients_api.py): a client is {name, createdAt, lastUsedAt,
// budget: {usd, period} | null, spend: {usd, inFlightUsd, periodStart, periodEnd}, rpm, tpm, models}; the settings sent
// are {budgetUsd, period, rpm, tpm, models}, null clearing a limit.
import { getJSON, request, spent } from "./api.js";
import { el } from "./markdown.js";

const PERIODS = ["day", "week", "month", "total"];

function field(id, label, attrs = {}) {
  return el("div", { class: "field" }, el("label", { for: id }, label), el("input", { id, name: id, ...attrs }));
}

function usd(value) {
  const n = Number(value || 0);
  return `$${n.toFixed(n >= 1 || n === 0 ? 2 : 4)}`;
}

function when(iso) {
  return iso ? iso.replace("T", " ").replace(/(\.\d+)?(Z|\+00:00)$/, " UTC") : "never";
}

function showKey(box, name, key) {
  const copy = el("button", { type: "button", "aria-label": `Copy the key of ${name}` }, "Copy");
  copy.addEventListener("click", async () => {
    await navigator.clipboard.writeText(key);
    copy.textContent = "Copied";
  });
  box.replaceChildren(el("div", { class: "notice key-once", role: "status" },
    el("strong", {}, `The key of ${name} (shown once, copy it now): `), el("code", { id: "new-key" }, key), " ", copy));
}

function showError(box, error) {
  box.replaceChildren(el("p", { class: "error", role: "alert" }, error.message));
}

// The limit fields, ids prefixed so that the create and the edit form can be on the page together.
function limitsFields(prefix, c = null) {
  const period = c?.budget?.period ?? "month";
  return [
    field(`${prefix}-budget`, "Budget (USD, empty: none)", { type: "number", min: "0", step: "0.01", value: c?.budget?.usd ?? "" }),
    el("div", { class: "field" }, el("label", { for: `${prefix}-period` }, "Budget period"),
      el("select", { id: `${prefix}-period`, name: "period" }, ...PERIODS.map((p) => el("option", { value: p, selected: p === period }, p)))),
    field(`${prefix}-rpm`, "Requests per minute (empty: no limit)", { type: "number", min: "1", step: "1", value: c?.rpm ?? "" }),
    field(`${prefix}-tpm`, "Tokens per minute (empty: no limit)", { type: "number", min: "1", step: "1", value: c?.tpm ?? "" }),
    field(`${prefix}-models`, "Models (patterns, comma-separated; empty: all)", { value: (c?.models || []).join(", ") }),
  ];
}

// The settings of a form as /api/clients takes them: an empty field clears its limit (null).
function settings(form, prefix) {
  const value = (name) => form.querySelector(`#${prefix}-${name}`).value.trim();
  const number = (name) => (value(name) === "" ? null : Number(value(name)));
  return {
    budgetUsd: number("budget"),
    period: value("period"),
    rpm: number("rpm"),
    tpm: number("tpm"),
    models: value("models").split(",").map((s) => s.trim()).filter(Boolean),
  };
}

function spendCell(c) {
  // The spend as posted (what the CLI and the usage report add up); calls in flight hold more until they end.
  const spend = c.spend?.usd ?? 0;
  const held = c.spend?.inFlightUsd ? ` (${spent(c.spend.inFlightUsd)} held by calls in flight)` : "";
  if (!c.budget) return el("td", { "data-spend": spend }, `${spent(spend)} (no budget)${held}`);
  const { usd: budget, period } = c.budget;
  const resets = c.spend?.periodEnd ? `, resets ${when(c.spend.periodEnd)}` : "";
  return el("td", { "data-spend": spend, class: spend >= budget ? "error" : undefined },
    el("meter", { min: 0, max: budget || 1, value: Math.min(spend, budget), "aria-label": `${c.name}: spend against budget` }),
    ` ${spent(spend)} of ${usd(budget)} / ${period}${resets}${held}`);
}

export async function clientsPage(main) {
  const notice = el("div", { id: "client-notice", "aria-live": "polite" });
  const list = el("div", { id: "clients-list" });
  const editor = el("div", { id: "client-edit" });
  const create = el("form", { class: "card client-form", "aria-label": "New client" }, el("h2", {}, "New client"),
    field("new-name", "Name", { required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", autocomplete: "off" }),
    ...limitsFields("new"),
    el("button", { type: "submit", class: "primary" }, "Create"));
  main.replaceChildren(el("h1", {}, "Clients"), notice, list, editor, create);

  // An action's error goes to the notice; the list is then read again from the gateway.
  const act = async (action) => {
    try {
      await action();
    } catch (e) {
      showError(notice, e);
    }
    await refresh();
  };

  const editForm = (c) => {
    const form = el("form", { class: "card client-form", "aria-label": `Edit ${c.name}` }, el("h2", {}, `Edit ${c.name}`),
      ...limitsFields("edit", c),
      el("div", { class: "toolbar" }, el("button", { type: "submit", class: "primary" }, "Save"),
        el("button", { type: "button", onclick: () => editor.replaceChildren() }, "Cancel")));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      act(async () => {
        await request(`/api/clients/${encodeURIComponent(c.name)}`, { method: "PATCH", body: settings(form, "edit") });
        editor.replaceChildren();
        notice.replaceChildren(el("p", { role: "status" }, `Saved ${c.name}.`));
      });
    });
    editor.replaceChildren(form);
    form.querySelector("#edit-budget").focus();
  };

  const row = (c) => {
    const path = `/api/clients/${encodeURIComponent(c.name)}`;
    const edit = el("button", { type: "button", "aria-label": `Edit ${c.name}` }, "Edit");
    const rotate = el("button", { type: "button", "aria-label": `Rotate the key of ${c.name}` }, "Rotate");
    const remove = el("button", { type: "button", "aria-label": `Remove ${c.name}` }, "Remove");
    edit.addEventListener("click", () => editForm(c));
    rotate.addEventListener("click", () => act(async () => {
      const data = await (await request(`${path}/rotate`, { method: "POST" })).json();
      showKey(notice, c.name, data.key);
    }));
    remove.addEventListener("click", () => {
      if (remove.dataset.confirm !== "1") { // a second click removes
        remove.dataset.confirm = "1";
        remove.textContent = "Confirm remove";
        remove.setAttribute("aria-label", `Confirm: remove ${c.name}`);
        return;
      }
      act(async () => {
        await request(path, { method: "DELETE" });
        notice.replaceChildren(el("p", { role: "status" }, `Removed ${c.name}; its usage stays in the reports.`));
      });
    });
    const limits = [c.rpm ? `${c.rpm} rpm` : null, c.tpm ? `${c.tpm} tpm` : null].filter(Boolean).join(", ") || "none";
    // data-label names each cell where a phone shows a row as a card (no header row in view).
    const spend = spendCell(c);
    spend.dataset.label = "Spend";
    return el("tr", { "data-client": c.name }, el("th", { scope: "row" }, c.name),
      spend,
      el("td", { "data-label": "Rate limits" }, limits),
      el("td", { "data-label": "Models" }, (c.models || []).join(", ") || "all"),
      el("td", { "data-label": "Last used" }, when(c.lastUsedAt)),
      el("td", { class: "actions" }, edit, " ", rotate, " ", remove));
  };

  const refresh = async () => {
    const { clients = [] } = await getJSON("/api/clients");
    list.replaceChildren(clients.length
      ? el("div", { class: "table-wrap" }, el("table", { class: "clients-table" }, el("caption", {}, "Client keys"),
        el("thead", {}, el("tr", {}, ...["Name", "Spend in period", "Rate limits", "Models", "Last used", "Actions"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...clients.map(row))))
      : el("p", { class: "muted" }, "No clients yet: create one below. Its key signs in here and on every API."));
  };

  create.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = create.querySelector("#new-name").value.trim();
    const body = settings(create, "new");
    act(async () => {
      await request("/api/clients", { method: "POST", body: { name, ...body } }).then((r) => r.json()).then((data) => showKey(notice, name, data.key));
      create.reset();
    });
  });
  await refresh();
}
