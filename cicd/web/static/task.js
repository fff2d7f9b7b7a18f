// The build page: follows the task through the JSON API, its log through
// Server-Sent Events, and drives the Cancel / Retry / Approve / Reject buttons.
//
// The log can be long: events are queued and drawn once per animation frame,
// and only the last `data-max-lines` lines stay in the page (the raw log is a
// link). ANSI colours are drawn by ansi.js, which escapes every line first.

import { SgrState, renderLine, skipLine } from "./ansi.js";
import { post, setLive, toast } from "./opscd.js";

const FINISHED = new Set(["success", "failed", "canceled"]);
const POLL_MS = 2000;

const root = document.getElementById("task");
const taskId = root.dataset.taskId;
let task = null; // the last answer of GET /api/tasks/<id>

// --- the log ------------------------------------------------------------------------------

class LogView {
  constructor(element, maxLines, onDropped) {
    this.element = element;
    this.maxLines = maxLines;
    this.onDropped = onDropped;
    this.state = new SgrState();
    this.queue = [];
    this.partial = ""; // text after the last newline, drawn but not yet a line
    this.partialNode = null;
    this.lines = 0; // complete lines in the page
    this.dropped = 0; // lines no longer in the page
    this.ended = false;
    this.scheduled = false;
    this.follow = true;
  }

  push(text) {
    this.queue.push(text);
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  end() {
    this.ended = true;
    this.push("");
  }

  flush() {
    this.scheduled = false;
    const lines = (this.partial + this.queue.join("")).split("\n");
    this.queue.length = 0;
    this.partial = lines.pop();
    if (this.ended && this.partial) {
      lines.push(this.partial);
      this.partial = "";
    }
    // Lines that would be dropped at once are never drawn, only read for their colours.
    const skip = Math.max(0, lines.length - this.maxLines);
    for (let i = 0; i < skip; i++) skipLine(lines[i], this.state);
    let html = "";
    for (let i = skip; i < lines.length; i++) {
      html += `<div class="line">${renderLine(lines[i], this.state)}</div>`;
    }
    this.partialNode?.remove();
    this.partialNode = null;
    if (html) this.element.insertAdjacentHTML("beforeend", html);
    this.lines += lines.length - skip;
    this.dropped += skip;
    const excess = this.lines - this.maxLines;
    if (excess > 0) {
      const range = document.createRange();
      range.setStartBefore(this.element.firstElementChild);
      range.setEndAfter(this.element.children[excess - 1]);
      range.deleteContents();
      this.lines -= excess;
      this.dropped += excess;
    }
    if (this.partial) {
      this.partialNode = document.createElement("div");
      this.partialNode.className = "line partial";
      this.partialNode.innerHTML = renderLine(this.partial, this.state.copy());
      this.element.append(this.partialNode);
    }
    if (this.dropped) {
      this.element.style.counterReset = `line ${this.dropped}`;
      this.onDropped();
    }
    if (this.follow) this.element.scrollTop = this.element.scrollHeight;
  }

  atBottom() {
    const el = this.element;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 24;
  }
}

function followLog() {
  const element = document.getElementById("log");
  const status = document.getElementById("log-status");
  const followBox = document.getElementById("log-follow");
  const view = new LogView(element, Number(root.dataset.maxLines) || 5000, () => {
    document.getElementById("log-truncated").hidden = false;
  });
  // Scrolling up stops following; scrolling back to the end (or the box) resumes it.
  element.addEventListener("scroll", () => {
    view.follow = view.atBottom();
    followBox.checked = view.follow;
  });
  followBox.addEventListener("change", () => {
    view.follow = followBox.checked;
    if (view.follow) element.scrollTop = element.scrollHeight;
  });

  const source = new EventSource(`${root.dataset.log}?follow=1`);
  status.textContent = "connecting…";
  source.onopen = () => {
    status.textContent = FINISHED.has(root.dataset.state) ? "loading…" : "live";
  };
  source.onmessage = (event) => view.push(event.data);
  // A step's output: its first data line names the step (the text shows its own header).
  source.addEventListener("step", (event) => view.push(event.data.slice(event.data.indexOf("\n") + 1)));
  source.addEventListener("end", (event) => {
    source.close(); // else EventSource would reconnect and read it all again
    view.end();
    status.textContent = `ended: ${event.data}`;
    refresh();
  });
  source.onerror = () => {
    status.textContent =
      source.readyState === EventSource.CLOSED ? "disconnected (reload the page)" : "reconnecting…";
  };
}

// --- the task -----------------------------------------------------------------------------

function field(name) {
  return root.querySelector(`[data-field="${name}"]`);
}

function show(name, visible) {
  const element = field(name);
  if (element) element.hidden = !visible;
}

function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 10) return `${seconds.toFixed(1)}s`;
  const whole = Math.floor(seconds);
  if (whole < 60) return `${whole}s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (whole < 3600) return `${Math.floor(whole / 60)}m ${pad(whole % 60)}s`;
  return `${Math.floor(whole / 3600)}h ${pad(Math.floor((whole % 3600) / 60))}m`;
}

function elapsed(item) {
  if (!item.started_at) return null;
  const end = item.finished_at ? Date.parse(item.finished_at) : Date.now();
  return Math.max(0, (end - Date.parse(item.started_at)) / 1000);
}

function formatWhen(iso) {
  return iso ? `${iso.replace("T", " ").slice(0, 19)} UTC` : "";
}

function stageLabel(stage) {
  if (stage.state) return [stage.state, stage.state];
  if (stage.stage === "publish" && task.state === "waiting") return ["awaiting approval", "waiting"];
  if (FINISHED.has(task.state)) return ["not run", "pending"];
  return ["pending", "pending"];
}

function drawDurations() {
  if (!task) return;
  field("duration").textContent = formatDuration(elapsed(task)) || "—";
  for (const stage of task.stages) {
    const item = root.querySelector(`[data-stage="${stage.stage}"]`);
    if (item) item.querySelector('[data-stage-field="duration"]').textContent =
      formatDuration(elapsed(stage));
  }
  for (const step of task.steps || []) {
    const item = root.querySelector(`[data-step="${CSS.escape(step.name)}"]`);
    if (item) item.querySelector('[data-step-field="duration"]').textContent =
      formatDuration(elapsed(step));
  }
}

function drawSteps() {
  const list = field("steps");
  list.hidden = !(task.steps || []).length;
  for (const step of task.steps || []) {
    let item = list.querySelector(`[data-step="${CSS.escape(step.name)}"]`);
    if (!item) {
      item = document.createElement("li");
      item.dataset.step = step.name;
      item.innerHTML = `<details><summary><span class="dot" aria-hidden="true"></span>
        <span class="step-name"></span> <span class="step-state" data-step-field="state"></span>
        <span class="step-duration" data-step-field="duration"></span>
        <span class="step-reason muted" data-step-field="reason"></span></summary>
        <pre class="log step-log"></pre></details>`;
      item.querySelector(".step-name").textContent = step.name;
      const url = new URL(root.dataset.log, window.location.href);
      url.searchParams.set("step", step.name);
      item.querySelector(".step-log").dataset.stepLog = url.pathname + url.search;
      list.append(item);
    }
    item.className = `step step-${step.state}`;
    item.querySelector('[data-step-field="state"]').textContent =
      step.exit_code ? `${step.state} (${step.exit_code})` : step.state;
    item.querySelector('[data-step-field="reason"]').textContent = step.reason || "";
  }
}

// A step's own section of the log, read when its row is opened (and again when reopened).
root.addEventListener(
  "toggle",
  async (event) => {
    const details = event.target;
    if (!(details instanceof HTMLDetailsElement) || !details.open) return;
    const pre = details.querySelector("[data-step-log]");
    if (!pre) return;
    const response = await fetch(pre.dataset.stepLog, { headers: { Accept: "text/plain" } });
    pre.textContent = response.ok ? await response.text() : `HTTP ${response.status}`;
  },
  true,
);

function render(data) {
  task = data;
  const finished = FINISHED.has(task.state);
  root.dataset.state = task.state;
  const state = field("state");
  state.textContent = task.state;
  state.className = `state state-${task.state} big`;
  document.title = `#${task.task_id} ${task.state} · ${task.project} · OpsCD`;

  for (const stage of task.stages || []) {
    const item = root.querySelector(`[data-stage="${stage.stage}"]`);
    if (!item) continue;
    const [label, kind] = stageLabel(stage);
    item.className = `stage stage-${kind}`;
    item.querySelector('[data-stage-field="state"]').textContent = label;
    const worker = item.querySelector('[data-stage-field="worker"]');
    worker.textContent = (stage.worker || "").split("@")[0];
    worker.title = stage.worker || "";
  }
  field("worker").textContent = task.worker || "—";
  field("error").textContent = task.error || "";
  show("error", Boolean(task.error));
  field("image").textContent = task.image || "";
  field("image_digest").textContent = task.image_digest || "";
  show("image-row", Boolean(task.image));
  show("approval-request", task.state === "waiting");
  const approval = task.approval;
  if (approval && approval.decision) {
    field("approval").textContent =
      `${approval.decision} by ${approval.decided_by || "someone"}, ${formatWhen(approval.decided_at)}`;
  }
  show("approval-row", Boolean(approval && approval.decision));
  root.querySelector('[data-action="cancel"]').hidden = finished;
  root.querySelector('[data-action="retry"]').hidden = !finished;
  root.querySelector('[data-action="retry-failed"]').hidden =
    task.state !== "failed" || !(task.steps || []).length;
  drawSteps();
  drawDurations();
}

async function refresh() {
  try {
    const response = await fetch(root.dataset.api, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    setLive(true);
  } catch {
    setLive(false);
  }
}

// A canceled build is finished at once, while its running stage ends a moment later on
// its agent: keep following it until no stage is still running.
function settled(current) {
  return (
    FINISHED.has(current.state) && !(current.stages || []).some((s) => s.state === "running")
  );
}

async function poll() {
  await refresh();
  if (task && settled(task)) {
    document.getElementById("live").hidden = true;
    return;
  }
  setTimeout(poll, POLL_MS);
}

// --- the buttons --------------------------------------------------------------------------

const CONFIRM = {
  cancel: "Cancel this build? Its running script is killed.",
  reject: "Reject publishing? The build ends as canceled.",
};

root.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const action = button.dataset.action;
  if (CONFIRM[action] && !window.confirm(CONFIRM[action])) return;
  button.disabled = true;
  try {
    const endpoint = action === "retry-failed" ? "retry?from=failed" : action;
    const [response, body] = await post(`${root.dataset.api}/${endpoint}`);
    if (!response.ok) {
      toast(body.error || `${action} failed: HTTP ${response.status}`, "error");
      return;
    }
    if (action === "retry" || action === "retry-failed") {
      window.location.href = root.dataset.page.replace(/0$/, String(body.task_id));
      return;
    }
    render(body);
    toast(`Build #${taskId}: ${body.state}`);
  } catch (error) {
    toast(`${action} failed: ${error.message}`, "error");
  } finally {
    button.disabled = false;
  }
});

followLog();
poll();
setInterval(() => {
  if (task && !FINISHED.has(task.state)) drawDurations();
}, 1000);
