// API keys: list (GET /api/v1/auth/api-keys), create (POST; the raw key is shown once, with a
// copy button) and revoke (DELETE /api/v1/auth/api-keys/{id}) — the caller's own keys.

import { allPages, call } from "../api.js";
import { announce, fmtTime, h, replace } from "../dom.js";
import { dataTable, errorBox, field, rowHeader, section } from "../widgets.js";

const EXPIRY_DAYS = [
  { value: "30", label: "30 days" },
  { value: "90", label: "90 days" },
  { value: "365", label: "1 year" },
  { value: "", label: "Never" },
];

export function mount(root) {
  const errors = errorBox();
  const keys = dataTable("Your API keys", ["Name", "Key", "Status", "Created", "Expires", "Action"], { id: "key-table" });
  const created = h("div", { class: "created-key", id: "created-key" });
  root.append(errors.element, createForm(), created, keys.element);

  async function load() {
    try {
      const items = await allPages("/api/v1/auth/api-keys");
      keys.setRows(
        items.map((k) => [
          rowHeader(k.name),
          h("code", { text: `${k.keyPreview}…` }),
          h("span", { class: `badge ${k.status}`, text: k.status }),
          fmtTime(k.createdAt),
          k.expiresAt ? fmtTime(k.expiresAt) : "never",
          k.status === "active" ? revokeControl(k) : "—",
        ]),
        "No API keys yet.",
      );
      errors.clear();
    } catch (error) {
      if (error.status !== 401) errors.show(error);
    }
  }

  function revokeControl(key) {
    const cell = h("span", { class: "actions" });
    const ask = h("button", {
      type: "button",
      class: "danger",
      text: "Revoke",
      "aria-label": `Revoke key ${key.name}`,
      onclick: () => {
        const yes = h("button", {
          type: "button",
          class: "danger",
          text: "Yes, revoke",
          "aria-label": `Yes, revoke key ${key.name}`,
          onclick: async () => {
            try {
              await call(`/api/v1/auth/api-keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
              announce(`Key ${key.name} revoked.`);
              load();
            } catch (error) {
              if (error.status !== 401) errors.show(error);
            }
          },
        });
        const no = h("button", { type: "button", class: "secondary", text: "Cancel", onclick: () => { replace(cell, ask); ask.focus(); } });
        replace(cell, `Revoke ${key.name}? `, yes, no);
        yes.focus();
      },
    });
    cell.append(ask);
    return cell;
  }

  function createForm() {
    const formErrors = errorBox();
    const name = h("input", { name: "name", required: true, maxlength: "100", autocomplete: "off" });
    const expiry = h("select", { name: "expires" }, EXPIRY_DAYS.map((o) => h("option", { value: o.value, text: o.label })));
    const form = h(
      "form",
      {
        class: "inline",
        "aria-label": "Create an API key",
        onsubmit: async (event) => {
          event.preventDefault();
          formErrors.clear();
          const body = { name: name.value.trim() };
          if (expiry.value) body.expiresAt = new Date(Date.now() + Number(expiry.value) * 86400000).toISOString();
          try {
            const key = await call("/api/v1/auth/api-keys", { method: "POST", body });
            showOnce(key);
            name.value = "";
            load();
          } catch (error) {
            if (error.status !== 401) formErrors.show(error);
          }
        },
      },
      field("Key name", name),
      field("Expires", expiry),
      h("button", { type: "submit", text: "Create key" }),
    );
    return section("Create a key", formErrors.element, form);
  }

  function showOnce(key) {
    const raw = h("code", { id: "raw-key", class: "raw-key", text: key.rawKey });
    const copied = h("span", { class: "hint", role: "status" });
    const copy = h("button", {
      type: "button",
      text: "Copy key",
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(key.rawKey);
          copied.textContent = "Copied to the clipboard.";
        } catch {
          const range = document.createRange();
          range.selectNodeContents(raw);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          copied.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
        }
      },
    });
    const dismiss = h("button", { type: "button", class: "secondary", text: "I have saved it", onclick: () => created.replaceChildren() });
    replace(
      created,
      h(
        "div",
        { class: "notice", role: "region", "aria-label": "New API key" },
        h("p", {}, h("strong", { text: `Key “${key.name}” created. ` }), "Copy it now: it is shown only this once, and only its digest is kept."),
        raw,
        h("div", { class: "actions" }, copy, dismiss, copied),
      ),
    );
    announce(`Key ${key.name} created. It is shown only once.`);
    copy.focus();
  }

  load();
  return { destroy() {} };
}
