// The usage page: the gateway's reports (GET /api/usage), shown as they are: nothing is summed here.
import { FALLBACK_NOTE, getJSON, spent } from "./api.js";
import { el, plainText } from "./markdown.js";

const RANGES = [["today", "Today"], ["7d", "7 days"], ["30d", "30 days"], ["custom", "Custom"]];
// Cost first: on a phone the table scrolls sideways, and the column that matters most stays in view. The
// cost includes the server-tool fees (web search, ...), which have their own column next to it.
const COLUMNS = [
  ["totalCost", "Cost (USD)"], ["serverToolCost", "Server tools (USD)"], ["requestCount", "Requests"], ["errorCount", "Errors"], ["inputTokens", "Input"], ["outputTokens", "Output"],
  ["cacheReadTokens", "Cache read"], ["cacheWriteTokens", "Cache write"], ["totalTokens", "Total tokens"],
];
const SVG = "http://www.w3.org/2000/svg";
let current = { range: "7d", from: "" };

function fmt(key, value) {
  if (value === undefined || value === null) return "—";
  if (key === "totalCost" || key === "serverToolCost") return spent(value);
  return Number(value).toLocaleString("en-US");
}

// The `since` of the gateway's report for the chosen range (UTC days, as the reports count them).
export function sinceOf(range, from) {
  if (range === "today") return new Date().toISOString().slice(0, 10);
  if (range === "custom") return from || new Date().toISOString().slice(0, 10);
  return range;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  node.append(...children);
  return node;
}

// A cell of the table; the server-tool fee says how many uses it paid for.
function cell(field, totals) {
  const uses = field === "serverToolCost" ? totals.serverToolUses || 0 : 0;
  return el("td", { "data-field": field, "data-value": totals[field] ?? "", ...(uses ? { "data-uses": uses, title: `${uses} server-tool uses` } : {}) },
    fmt(field, totals[field]), uses ? el("span", { class: "muted" }, ` (${uses})`) : null);
}

function table(caption, keyLabel, rows, total, linkOf) {
  const head = el("tr", {}, el("th", { scope: "col" }, keyLabel), ...COLUMNS.map(([, label]) => el("th", { scope: "col" }, label)));
  const body = Object.entries(rows).map(([key, totals]) =>
    el("tr", { "data-key": key },
      el("th", { scope: "row" }, linkOf ? linkOf(key) : key,
        totals.priceKnown === false ? el("abbr", { class: "estimate", title: FALLBACK_NOTE }, "*") : null),
      ...COLUMNS.map(([field]) => cell(field, totals))));
  const foot = total
    ? el("tfoot", {}, el("tr", {}, el("th", { scope: "row" }, "Total"),
      ...COLUMNS.map(([field]) => cell(field, total))))
    : null;
  const estimated = Object.values(rows).some((t) => t.priceKnown === false);
  return el("div", { class: "table-wrap" }, el("table", {}, el("caption", {}, caption), el("thead", {}, head), el("tbody", {}, ...body), foot),
    estimated ? el("p", { class: "muted footnote" }, `* ${FALLBACK_NOTE}.`) : null);
}

function chart(perDay) {
  const days = Object.keys(perDay).sort();
  const models = [...new Set(days.flatMap((d) => Object.keys(perDay[d])))].sort();
  if (!days.length) return el("p", { class: "muted" }, "No usage in this range.");
  // The bar height is the day's cost as the report gives it per model; the chart only stacks them.
  const dayTotal = (d) => Object.values(perDay[d]).reduce((a, t) => a + (t.totalCost || 0), 0);
  const max = Math.max(...days.map(dayTotal)) || 1;
  const width = 640, height = 220, pad = 28, band = Math.min(80, (width - pad * 2) / days.length);
  const bars = [];
  days.forEach((day, i) => {
    let y = height - pad;
    models.forEach((model, m) => {
      const t = perDay[day][model];
      if (!t) return;
      const h = ((t.totalCost || 0) / max) * (height - pad * 2);
      y -= h;
      bars.push(svg("rect", { x: pad + i * band + band * 0.15, y, width: band * 0.7, height: Math.max(h, 0), class: `seg-${m % 8}` },
        svg("title", {}, `${day} ${model}: $${(t.totalCost || 0).toFixed(6)}, ${t.requestCount} requests`)));
    });
    bars.push(svg("text", { x: pad + i * band + band / 2, y: height - 8, "text-anchor": "middle", class: "axis" }, day.slice(5)));
  });
  const figure = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "Cost per day, stacked by model", class: "chart" },
    svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis-line" }),
    svg("text", { x: pad, y: 14, class: "axis" }, `max $${max.toFixed(max >= 1 ? 2 : 6)}`),
    ...bars);
  const legend = el("ul", { class: "legend" }, ...models.map((model, m) =>
    el("li", {}, el("span", { class: `swatch seg-${m % 8}`, "aria-hidden": "true" }), model)));
  return el("figure", { class: "chart-box" }, figure, el("figcaption", {}, "Cost per day (UTC), stacked by model"), legend);
}

function csv(report) {
  const quote = (v) => (/[",\n]/.test(String(v)) ? `"${String(v).replaceAll('"', '""')}"` : String(v));
  const header = ["model", ...COLUMNS.map(([field]) => field)];
  const line = (key, t) => [key, ...COLUMNS.map(([field]) => t[field] ?? "")].map(quote).join(",");
  return [header.join(","), ...Object.entries(report.perModel).map(([k, t]) => line(k, t)), line("TOTAL", report.grandTotal)].join("\n") + "\n";
}

export async function usagePage(main, { sessions }) {
  const range = el("select", { id: "range", name: "range" }, ...RANGES.map(([v, label]) => el("option", { value: v, selected: v === current.range }, label)));
  const from = el("input", { id: "from", name: "from", type: "date", value: current.from, hidden: current.range !== "custom" });
  const fromLabel = el("label", { for: "from", hidden: current.range !== "custom" }, "From (UTC)");
  const exportButton = el("button", { type: "button", id: "export" }, "Export CSV");
  const body = el("div", { id: "usage-body" }, el("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(
    el("h1", {}, "Usage"),
    el("form", { class: "toolbar", "aria-label": "Date range" }, el("label", { for: "range" }, "Range"), range, fromLabel, from, exportButton),
    body);
  let report = null;
  let latest = 0; // a range changed while its report loads: only the last one is shown
  const load = async () => {
    const mine = ++latest;
    current = { range: range.value, from: from.value };
    from.hidden = fromLabel.hidden = range.value !== "custom";
    const since = encodeURIComponent(sinceOf(range.value, from.value));
    body.setAttribute("aria-busy", "true");
    // A client key's reports hold its own records only (by=client too: one row, its own).
    const [byModel, byDay, bySession, byClient] = await Promise.all(["model", "day-model", "session", "client"].map((by) => getJSON(`/api/usage?by=${by}&since=${since}`)));
    if (mine !== latest) return;
    report = byModel;
    const g = byModel.grandTotal;
    const card = (id, label, value) => el("div", { class: "stat card", id: `card-${id}`, "data-value": value ?? "" }, el("span", { class: "muted" }, label), el("strong", {}, fmt(id, value)));
    const titles = Object.fromEntries(sessions.map((s) => [s.id, plainText(s.title)]));
    body.replaceChildren(
      el("div", { class: "cards" },
        card("totalCost", "Cost", g.totalCost), card("serverToolCost", "Server tools", g.serverToolCost), card("requestCount", "Requests", g.requestCount), card("errorCount", "Errors", g.errorCount),
        card("inputTokens", "Input tokens", g.inputTokens), card("outputTokens", "Output tokens", g.outputTokens),
        card("cacheReadTokens", "Cache read tokens", g.cacheReadTokens), card("cacheWriteTokens", "Cache write tokens", g.cacheWriteTokens)),
      chart(byDay.perDay),
      table("By model", "Model", byModel.perModel, byModel.grandTotal),
      table("By client", "Client", byClient.perClient),
      table("By session", "Session", bySession.perSession, null,
        (id) => (id === "none" ? "(no session)" : el("a", { href: `#/chat/${encodeURIComponent(id)}` }, titles[id] || id))));
    body.removeAttribute("aria-busy");
  };
  range.addEventListener("change", load);
  from.addEventListener("change", load);
  exportButton.addEventListener("click", () => {
    if (!report) return;
    const url = URL.createObjectURL(new Blob([csv(report)], { type: "text/csv" }));
    const a = el("a", { href: url, download: `agentspace-usage-${sinceOf(current.range, current.from)}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  });
  await load();
}
