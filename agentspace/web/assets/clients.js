// The clients page (gateway token only): client keys with spend against budget; create (the key is shown
// once), edit budget and limits, rotate, remove. Shown only when the gateway has /api/clients.
import { getJSON, request } from "./api.js";
import { el } from "./markdown.js";

function field(id, label, attrs = {}) {
  return el("div", { class: "field" }, el("label", { for: id }, label), el("input", { id, name: id, ...attrs }));
}

function showKey(box, key) {
  const copy = el("button", { type: "button", onclick: () => navigator.clipboard.writeText(key).then(() => (copy.textContent = "Copied")) }, "Copy");
  box.replaceChildren(el("div", { class: "notice key-once", role: "status" },
    el("strong", {}, "The new key (shown once): "), el("code", { id: "new-key" }, key), " ", copy));
}

function limitsBody(form) {
  const value = (id) => form.querySelector(`#${id}`).value.trim();
  const body = {};
  if (value("budget")) body.budget = Number(value("budget"));
  if (value("period")) body.period = value("period");
  if (value("rpm")) body.rpm = Number(value("rpm"));
  if (value("tpm")) body.tpm = Number(value("tpm"));
  if (value("models")) body.models = value("models").split(",").map((s) => s.trim()).filter(Boolean);
  return body;
}

function limitsFields(c = {}) {
  return [
    field("budget", "Budget (USD)", { type: "number", min: "0", step: "0.01", value: c.budget ?? "" }),
    el("div", { class: "field" }, el("label", { for: "period" }, "Period"),
      el("select", { id: "period", name: "period" }, ...["", "day", "week", "month", "total"].map((p) =>
        el("option", { value: p, selected: (c.period || "") === p }, p || "(none)")))),
    field("rpm", "Requests per minute", { type: "number", min: "0", value: c.rpm ?? "" }),
    field("tpm", "Tokens per minute", { type: "number", min: "0", value: c.tpm ?? "" }),
    field("models", "Models (patterns, comma-separated)", { value: (c.models || []).join(", ") }),
  ];
}

export async function clientsPage(main) {
  const notice = el("div", { id: "client-notice" });
  const list = el("div", { id: "clients-list" });
  const name = field("name", "Name", { required: true, pattern: "[A-Za-z0-9_.-]+" });
  const create = el("form", { class: "card client-form", "aria-label": "New client" }, el("h2", {}, "New client"), name, ...limitsFields(),
    el("button", { type: "submit", class: "primary" }, "Create"));
  main.replaceChildren(el("h1", {}, "Clients"), notice, list, create);

  const refresh = async () => {
    const { clients = [] } = await getJSON("/api/clients");
    const rows = clients.map((c) => {
      const spend = c.spend ?? c.spent ?? 0;
      const budget = c.budget ?? null;
      const meter = budget ? el("meter", { min: 0, max: budget, value: Math.min(spend, budget), "aria-label": `${c.name} spend` }) : null;
      const rotate = el("button", { type: "button" }, "Rotate");
      const remove = el("button", { type: "button" }, "Remove");
      const edit = el("button", { type: "button" }, "Edit");
      rotate.addEventListener("click", async () => {
        const data = await (await request(`/api/clients/${encodeURIComponent(c.name)}/rotate`, { method: "POST" })).json();
        showKey(notice, data.key);
      });
      remove.addEventListener("click", async () => {
        if (remove.dataset.confirm !== "1") {
          remove.dataset.confirm = "1";
          remove.textContent = "Remove?";
          return;
        }
        await request(`/api/clients/${encodeURIComponent(c.name)}`, { method: "DELETE" });
        await refresh();
      });
      edit.addEventListener("click", () => {
        const form = el("form", { class: "card client-form", "aria-label": `Edit ${c.name}` }, el("h2", {}, `Edit ${c.name}`), ...limitsFields(c),
          el("button", { type: "submit", class: "primary" }, "Save"));
        form.addEventListener("submit", async (event) => {
          event.preventDefault();
          await request(`/api/clients/${encodeURIComponent(c.name)}`, { method: "PATCH", body: limitsBody(form) });
          await refresh();
        });
        list.append(form);
      });
      return el("tr", {}, el("th", { scope: "row" }, c.name),
        el("td", {}, `$${Number(spend).toFixed(4)}${budget ? ` of $${budget} / ${c.period || "total"}` : ""}`, meter),
        el("td", {}, [c.rpm ? `${c.rpm} rpm` : null, c.tpm ? `${c.tpm} tpm` : null].filter(Boolean).join(", ") || "—"),
        el("td", {}, (c.models || []).join(", ") || "all"),
        el("td", { class: "actions" }, edit, rotate, remove));
    });
    list.replaceChildren(el("div", { class: "table-wrap" }, el("table", {}, el("caption", {}, "Client keys"),
      el("thead", {}, el("tr", {}, ...["Name", "Spend", "Limits", "Models", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows))));
  };
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const data = await (await request("/api/clients", { method: "POST", body: { name: create.querySelector("#name").value.trim(), ...limitsBody(create) } })).json();
      showKey(notice, data.key);
      create.reset();
      await refresh();
    } catch (e) {
      notice.replaceChildren(el("p", { class: "error", role: "alert" }, e.message));
    }
  });
  await refresh();
}
