// OpsCD pages: shared helpers and the self-refreshing lists.
//
// A region marked `data-refresh` is fetched again every few seconds as a
// fragment of its own page (`?partial=1`, rendered by the same template) and
// swapped in when it changed: no full page reload, no flash. Polling pauses
// while the tab is hidden and while the reader works inside the region (a
// focused field, an open <details>), so a refresh never takes the cursor away.

const refreshMs = Number(document.body.dataset.refreshMs) || 3000;

/** Show a short message at the bottom of the page. */
export function toast(message, kind = "info") {
  const box = document.getElementById("toast");
  if (!box) return;
  box.textContent = message;
  box.className = `toast toast-${kind}`;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 6000);
}

/** POST to the API (with a JSON body if given); resolves to [response, parsed JSON or {}]. */
export async function post(url, json = undefined) {
  const headers = { Accept: "application/json", "X-Requested-With": "OpsCD" };
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method: "POST",
    headers,
    credentials: "same-origin",
    body: json === undefined ? undefined : JSON.stringify(json),
  });
  let body = {};
  try {
    body = await response.json();
  } catch {
    // an empty or non-JSON answer: keep {}
  }
  return [response, body];
}

/** Mark the page as live (or as having lost the server). */
export function setLive(ok) {
  const badge = document.getElementById("live");
  if (!badge) return;
  badge.hidden = false;
  badge.classList.toggle("lost", !ok);
  badge.textContent = ok ? "live" : "reconnecting…";
}

function busy(region) {
  return region.contains(document.activeElement) || region.querySelector("details[open]");
}

function keepRefreshing(region) {
  const url = new URL(window.location.href);
  url.searchParams.set("partial", "1");
  let last = region.innerHTML;
  async function tick() {
    if (!document.hidden && !busy(region)) {
      try {
        const response = await fetch(url, { headers: { Accept: "text/html" } });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const html = await response.text();
        if (html !== last) {
          region.innerHTML = html;
          last = region.innerHTML;
          region.dispatchEvent(new CustomEvent("refreshed", { bubbles: true }));
        }
        setLive(true);
      } catch {
        setLive(false);
      }
    }
    setTimeout(tick, refreshMs);
  }
  setLive(true);
  setTimeout(tick, refreshMs);
}

for (const region of document.querySelectorAll("[data-refresh]")) keepRefreshing(region);

// A click anywhere on a build's row opens the build (links inside still work as links).
document.addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-href]");
  if (!row || event.target.closest("a, button, input, summary")) return;
  if (window.getSelection()?.toString()) return; // the reader is selecting text
  if (event.ctrlKey || event.metaKey) window.open(row.dataset.href, "_blank");
  else window.location.href = row.dataset.href;
});

// Badge snippets: select the whole Markdown when it opens or is clicked, ready to copy.
document.addEventListener("focusin", (event) => {
  if (event.target.matches(".snippet input")) event.target.select();
});
document.addEventListener(
  "toggle",
  (event) => {
    if (event.target.matches(".snippet") && event.target.open) {
      event.target.querySelector("input")?.focus();
    }
  },
  true, // toggle does not bubble
);
