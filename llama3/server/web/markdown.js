// A small Markdown renderer for chat answers that builds DOM nodes and sets text only through textContent:
// model output can never become markup or script, whatever it contains. Supports fenced code blocks,
// headings, bullet and numbered lists, paragraphs, inline code, bold, italic and http(s) links.
"use strict";

function renderInline(text, parent) {
  // Tokens, leftmost first: `code`, **bold**, *italic* / _italic_, [text](http...)
  const pattern = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*|_[^_\n]+_)|(\[[^\]\n]+\]\((https?:\/\/[^)\s]+)\))/;
  let rest = text;
  while (rest.length > 0) {
    const m = pattern.exec(rest);
    if (!m) { parent.appendChild(document.createTextNode(rest)); return; }
    if (m.index > 0) parent.appendChild(document.createTextNode(rest.slice(0, m.index)));
    const token = m[0];
    let node;
    if (m[1]) { node = document.createElement("code"); node.textContent = token.slice(1, -1); }
    else if (m[2]) { node = document.createElement("strong"); renderInline(token.slice(2, -2), node); }
    else if (m[3]) { node = document.createElement("em"); renderInline(token.slice(1, -1), node); }
    else {
      node = document.createElement("a");
      node.textContent = token.slice(1, token.indexOf("]("));
      node.href = m[5];  // only http(s): the pattern admits no javascript: or data: URL
      node.target = "_blank";
      node.rel = "noopener noreferrer";
    }
    parent.appendChild(node);
    rest = rest.slice(m.index + token.length);
  }
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = /^```\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {  // a code block runs to the closing fence, or to the end while it is still streaming
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[1]) code.dataset.lang = fence[1];
      const body = [];
      i += 1;
      while (i < lines.length && !/^```\s*$/.test(lines[i])) { body.push(lines[i]); i += 1; }
      i += 1;
      code.textContent = body.join("\n");
      pre.appendChild(code);
      root.appendChild(pre);
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      const h = document.createElement("h" + Math.min(6, heading[1].length + 2));
      renderInline(heading[2], h);
      root.appendChild(h);
      i += 1;
      continue;
    }
    const item = /^\s*([-*+]|\d+[.)])\s+/;
    if (item.test(line)) {
      const list = document.createElement(/^\s*\d/.test(line) ? "ol" : "ul");
      while (i < lines.length && item.test(lines[i])) {
        const li = document.createElement("li");
        renderInline(lines[i].replace(item, ""), li);
        list.appendChild(li);
        i += 1;
      }
      root.appendChild(list);
      continue;
    }
    if (line.trim() === "") { i += 1; continue; }
    const para = [];
    while (i < lines.length && lines[i].trim() !== "" && !/^```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i])
           && !item.test(lines[i])) {
      para.push(lines[i]);
      i += 1;
    }
    const p = document.createElement("p");
    para.forEach((l, k) => { if (k) p.appendChild(document.createElement("br")); renderInline(l, p); });
    root.appendChild(p);
  }
  return root;
}
