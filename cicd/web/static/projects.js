// The Projects page: register a project, then show its webhook URL and secret, once.
//
// The form posts to the API (POST /api/projects) like `cicd projects add`; the
// secret is in that answer only, so it is shown here and nowhere else, and is
// gone with the next page load.

import { post, toast } from "./opscd.js";

const form = document.getElementById("register-project");
const shown = document.getElementById("registered");

form?.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const body = {
    forge: data.get("forge"),
    project: data.get("project").trim(),
    clone_url: data.get("clone_url").trim(),
    protected: data.get("protected").trim(),
    approval: data.get("approval").trim(),
  };
  const button = form.querySelector("button");
  button.disabled = true;
  try {
    const [response, answer] = await post(form.action, body);
    if (!response.ok) {
      toast(answer.error || `HTTP ${response.status}`, "error");
      return;
    }
    shown.querySelector("[data-field=project]").textContent = answer.project.project;
    shown.querySelector("[data-field=webhook_url]").value = answer.webhook_url;
    shown.querySelector("[data-field=webhook_secret]").value = answer.webhook_secret;
    shown.hidden = false;
    form.reset();
    const list = document.getElementById("registrations");
    const page = await fetch(`${window.location.pathname}?partial=registrations`, {
      headers: { Accept: "text/html" },
    });
    if (page.ok && list) list.innerHTML = await page.text();
  } finally {
    button.disabled = false;
  }
});
