// A small markdown renderer and code highlighter that build DOM nodes: model output never goes through
// innerHTML, so whatever it contains is shown as text. Links are kept only for http(s) and mailto URLs.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function safeUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

// --- code highlighting ---------------------------------------------------------------------------

const KEYWORDS = new Set(
  ("and as assert async await break case catch class const continue def default del do elif else enum export " +
    "extends false finally fn for from func function go if impl import in interface is lambda let match mod " +
    "module mut new nil none None not null or package pass private protected pub public raise return self " +
    "static struct super switch this throw true True False try type typeof use var void while with yield " +
    "select insert update delete where join echo fi then done esac local").split(" "),
);

// One alternation, tried at each position: comments, strings, numbers, words; everything else is plain text.
const TOKEN = /(\/\/[^\n]*|#[^\n]*|\/\*[\s\S]*?\*\/|--[^\n]*)|("(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|`(?:\\.|[^`\\])*`)|(\b\d[\d_]*(?:\.\d+)?(?:e[+-]?\d+)?\b|\b0x[0-9a-f]+\b)|([A-Za-z_$][\w$]*)/gi;
const HASH_COMMENTS = new Set(["python", "py", "sh", "bash", "shell", "zsh", "ruby", "rb", "yaml", "yml", "toml", "r", "perl", "conf", ""]);
const DASH_COMMENTS = new Set(["sql", "lua", "haskell", "hs"]);

export function highlight(code, lang = "") {
  lang = lang.toLowerCase();
  const out = document.createDocumentFragment();
  let last = 0;
  const plain = (text) => text && out.append(document.createTextNode(text));
  for (const m of code.matchAll(TOKEN)) {
    let cls = null;
    if (m[1] !== undefined) {
      const hash = m[1].startsWith("#");
      const dash = m[1].startsWith("--");
      // "#" starts a comment only in languages that use it; "--" only in SQL-like ones.
      if ((hash && !HASH_COMMENTS.has(lang)) || (dash && !DASH_COMMENTS.has(lang))) {
        continue;
      }
      cls = "tok-com";
    } else if (m[2] !== undefined) cls = "tok-str";
    else if (m[3] !== undefined) cls = "tok-num";
    else if (m[4] !== undefined) cls = KEYWORDS.has(m[4]) ? "tok-kw" : null;
    if (!cls) continue;
    plain(code.slice(last, m.index));
    out.append(el("span", { class: cls }, m[0]));
    last = m.index + m[0].length;
  }
  plain(code.slice(last));
  return out;
}

function codeBlock(code, lang) {
  const copy = el("button", { type: "button", class: "copy", "aria-label": "Copy code" }, "Copy");
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(code);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  const codeEl = el("code", { class: lang ? `lang-${lang}` : undefined });
  codeEl.append(highlight(code, lang));
  return el("div", { class: "code-block" },
    el("div", { class: "code-head" }, el("span", {}, lang || "code"), copy),
    el("pre", { tabindex: "0" }, codeEl));
}

// --- inline ----------------------------------------------------------------------------------------

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|\*([^\s*][\s\S]*?)\*|\b_([^\s_][\s\S]*?)_\b|\[([^\]]+)\]\(([^)\s]+)\)|(https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"])/g;

export function inline(text) {
  const out = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    out.append(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[2] !== undefined) out.append(el("code", {}, m[2].trim() ? m[2].replace(/^ (.*) $/, "$1") : m[2]));
    else if (m[3] !== undefined || m[4] !== undefined) out.append(el("strong", {}, inline(m[3] ?? m[4])));
    else if (m[5] !== undefined || m[6] !== undefined) out.append(el("em", {}, inline(m[5] ?? m[6])));
    else if (m[7] !== undefined) {
      const href = safeUrl(m[8]);
      out.append(href ? el("a", { href, target: "_blank", rel: "noopener noreferrer" }, inline(m[7])) : document.createTextNode(m[0]));
    } else if (m[9] !== undefined) {
      const href = safeUrl(m[9]);
      out.append(href ? el("a", { href, target: "_blank", rel: "noopener noreferrer" }, m[9]) : document.createTextNode(m[9]));
    }
  }
  out.append(document.createTextNode(text.slice(last)));
  return out;
}

// --- blocks ----------------------------------------------------------------------------------------

const TABLE_DELIMITER = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

// The cells of a table row: split on pipes that are not escaped (\|), without the outer ones.
function cells(line) {
  const trimmed = line.trim().replace(/^\|/, "").replace(/(?<!\\)\|$/, "");
  return trimmed.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

// Markdown as one line of plain text (session titles are the first words of a message, often markdown).
export function plainText(source) {
  return String(source ?? "")
    .replace(/```[\w+#.-]*/g, " ")
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, "$1")
    .replace(/^\s{0,3}(#{1,6}\s+|>\s?|[-*+]\s+|\d+[.)]\s+)/gm, "")
    .replace(/(\*\*|\*|`+|~~)(?=\S)([^]*?\S)\1/g, "$2")
    .replace(/(^|\s)(__?)(?=\S)([^]*?\S)\2(?=\s|$|[,;:!?])/g, "$1$3") // _emphasis_, not snake_case
    .replace(/\|/g, " ")
    .replace(/\s+/g, " ")
    .trim();
}

export function renderMarkdown(source) {
  const root = document.createDocumentFragment();
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      const p = el("p");
      paragraph.forEach((line, n) => {
        if (n) p.append(el("br"));
        p.append(inline(line));
      });
      root.append(p);
      paragraph = [];
    }
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)/);
    if (fence) {
      flush();
      const body = [];
      i++;
      // An unclosed fence (the answer is still streaming) runs to the end.
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      root.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      root.append(el(`h${Math.min(6, heading[1].length + 2)}`, {}, inline(heading[2].replace(/\s#+\s*$/, ""))));
      i++;
      continue;
    }
    if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
      flush();
      root.append(el("hr"));
      i++;
      continue;
    }
    // A table: a header row of cells between pipes, then a delimiter row (| --- | :-: |), then body rows.
    if (line.includes("|") && i + 1 < lines.length && TABLE_DELIMITER.test(lines[i + 1])) {
      flush();
      const aligns = cells(lines[i + 1]).map((c) => (/^:-+:$/.test(c) ? "center" : /-:$/.test(c) ? "right" : null));
      const row = (text, tag) =>
        el("tr", {}, cells(text).slice(0, aligns.length).map((cell, n) =>
          el(tag, { class: aligns[n] ? `align-${aligns[n]}` : undefined }, inline(cell))));
      const head = el("thead", {}, row(line, "th"));
      const body = el("tbody");
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) body.append(row(lines[i++], "td"));
      // Wide tables scroll inside their own box, not the page (a phone is 390 px wide).
      root.append(el("div", { class: "table-wrap", tabindex: "0" }, el("table", {}, head, body)));
      continue;
    }
    if (/^\s*>/.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*> ?/, ""));
      root.append(el("blockquote", {}, renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        const li = el("li", {}, inline(m[2]));
        i++;
        // Indented continuation lines belong to the item.
        while (i < lines.length && /^\s{2,}\S/.test(lines[i]) && !/^\s*([-*+]|\d+[.)])\s+/.test(lines[i])) {
          li.append(" ", inline(lines[i++].trim()));
        }
        list.append(li);
      }
      root.append(list);
      continue;
    }
    if (!line.trim()) {
      flush();
      i++;
      continue;
    }
    paragraph.push(line);
    i++;
  }
  flush();
  return root;
}
