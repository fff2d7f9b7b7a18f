// Build logs as HTML: ANSI colours (SGR) become spans, everything else is text.
//
// Each line is HTML-escaped FIRST; only then are the escape sequences (which
// contain no `<`, `>`, `&` or quotes) replaced by spans whose class names come
// from this file, never from the log. Supported: reset (0), bold (1, 22),
// foreground 30–37 and 90–97, default foreground (39). Other SGR codes are
// ignored (38/48 with their arguments skipped), other control sequences dropped.

const HTML_ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const CSI = /\x1b\[([0-9;:?]*)([ -/]*[@-~])/g;
const STRAY = /[\x00-\x08\x0b-\x1f\x7f]/g; // lone ESC, BEL, backspace...: not shown

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => HTML_ESCAPES[c]);
}

/** The colour and weight in force, carried from line to line as a terminal does. */
export class SgrState {
  constructor() {
    this.fg = null;
    this.bold = false;
  }

  copy() {
    const other = new SgrState();
    other.fg = this.fg;
    other.bold = this.bold;
    return other;
  }

  apply(params) {
    const codes = params === "" ? [0] : params.split(/[;:]/).map((p) => Number(p || 0));
    for (let i = 0; i < codes.length; i++) {
      const code = codes[i];
      if (code === 0) {
        this.fg = null;
        this.bold = false;
      } else if (code === 1) this.bold = true;
      else if (code === 22) this.bold = false;
      else if ((code >= 30 && code <= 37) || (code >= 90 && code <= 97)) this.fg = code;
      else if (code === 39) this.fg = null;
      else if (code === 38 || code === 48) {
        // 256 colours (5;n) or true colour (2;r;g;b): skip the arguments
        i += codes[i + 1] === 5 ? 2 : codes[i + 1] === 2 ? 4 : 0;
      }
    }
  }

  classes() {
    const names = [];
    if (this.fg !== null) names.push(`ansi-${this.fg}`);
    if (this.bold) names.push("ansi-bold");
    return names.join(" ");
  }
}

/** Advance `state` over a line without drawing it (for lines dropped from the page). */
export function skipLine(raw, state) {
  for (const match of raw.matchAll(CSI)) if (match[2] === "m") state.apply(match[1]);
}

/** One line of log as HTML, escaped; `state` is updated as the line's codes say. */
export function renderLine(raw, state) {
  let line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
  // A carriage return redraws the line (progress bars): keep what was drawn last,
  // but let the colours of the overwritten part count.
  const cr = line.lastIndexOf("\r");
  if (cr >= 0) {
    skipLine(line.slice(0, cr), state);
    line = line.slice(cr + 1);
  }
  const text = escapeHtml(line);
  let html = "";
  let open = false;
  const openSpan = () => {
    const classes = state.classes();
    if (classes) {
      html += `<span class="${classes}">`;
      open = true;
    }
  };
  openSpan();
  let last = 0;
  for (const match of text.matchAll(CSI)) {
    html += text.slice(last, match.index).replace(STRAY, "");
    last = match.index + match[0].length;
    if (match[2] !== "m") continue; // cursor moves, erase line...: dropped
    state.apply(match[1]);
    if (open) html += "</span>";
    open = false;
    openSpan();
  }
  html += text.slice(last).replace(STRAY, "");
  if (open) html += "</span>";
  return html;
}
