// Purchases: sagas with their status (GET /api/v1/tokens/purchases: a USER's own, an ADMIN's
// everyone's), each saga's event trail (GET /api/v1/tokens/purchase/{id}/events) and a form to
// start one (POST /api/v1/tokens/purchase with a fresh Idempotency-Key).

import { call, currentSession, isAdmin } from "../api.js";
import { announce, fmtInt, fmtTime, h, replace, shortId } from "../dom.js";
import { REFRESH_MS, dataTable, errorBox, field, num, numCol, poll, providerSelect, rowHeader, section, updatedStamp } from "../widgets.js";

const TERMINAL = new Set(["COMPLETED", "FAILED"]);

function idempotencyKey() {
  if (window.crypto && crypto.randomUUID) return `dashboard-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `dashboard-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

export function mount(root) {
  const errors = errorBox();
  const stamp = updatedStamp();
  const everyone = isAdmin();
  const columns = ["Saga", ...(everyone ? ["Owner"] : []), "Provider", numCol("Tokens"), "Status", "Started", "Updated", "Trail"];
  const sagas = dataTable(everyone ? "Purchases of every user" : "Your purchases", columns, { id: "purchase-table" });
  const trail = h("div", { id: "purchase-trail" });
  let open = null;
  root.append(startForm(), h("div", { class: "toolbar" }, stamp.element), errors.element, sagas.element, trail);

  async function refresh() {
    const body = await call("/api/v1/tokens/purchases", { query: { page: 1, page_size: 50 } });
    const me = currentSession().userId;
    sagas.setRows(
      body.items.map((s) => [
        rowHeader(h("code", { title: s.id, text: shortId(s.id) })),
        ...(everyone ? [s.userId === me ? `${s.userId} (you)` : s.userId] : []),
        s.provider,
        num(fmtInt(s.tokens)),
        h("span", { class: `badge ${s.status.toLowerCase()}`, text: s.status }, s.failureReason ? ` (${s.failureReason})` : ""),
        fmtTime(s.createdAt),
        fmtTime(s.updatedAt),
        h("button", {
          type: "button",
          class: "secondary",
          text: "Show trail",
          "aria-label": `Show trail of saga ${shortId(s.id)}`,
          "aria-controls": "purchase-trail",
          onclick: () => {
            open = s.id;
            showTrail(s);
          },
        }),
      ]),
      "No purchases yet.",
    );
    if (open && !body.items.some((s) => s.id === open)) open = null;
    errors.clear();
    stamp.mark();
  }

  async function showTrail(saga) {
    try {
      const events = await call(`/api/v1/tokens/purchase/${encodeURIComponent(saga.id)}/events`);
      const table = dataTable(`Event trail of saga ${saga.id}`, ["Event", "Status", "At", "Reason"]);
      table.setRows(
        events.items.map((e) => [rowHeader(e.type), e.status || e.payload?.status || "—", fmtTime(e.occurredAt || e.createdAt), e.reason || e.payload?.reason || "—"]),
        "No events yet.",
      );
      const heading = h("h3", { tabindex: "-1", text: `Trail: ${saga.status}${TERMINAL.has(saga.status) ? "" : " (in progress)"}` });
      replace(trail, heading, table.element);
      heading.focus();
    } catch (error) {
      if (error.status !== 401) errors.show(error);
    }
  }

  function startForm() {
    const formErrors = errorBox();
    const done = h("p", { class: "success", role: "status" });
    const provider = providerSelect();
    const tokens = h("input", { name: "tokens", type: "number", min: "1", step: "1", required: true, value: "500" });
    const form = h(
      "form",
      {
        class: "inline",
        "aria-label": "Buy tokens",
        onsubmit: async (event) => {
          event.preventDefault();
          formErrors.clear();
          done.textContent = "";
          try {
            const accepted = await call("/api/v1/tokens/purchase", {
              method: "POST",
              headers: { "Idempotency-Key": idempotencyKey() },
              body: { userId: currentSession().userId, provider: provider.value, tokens: Number(tokens.value) },
            });
            done.textContent = `Purchase ${shortId(accepted.sagaId)} started (${accepted.status}).`;
            announce(done.textContent);
            poller.now();
          } catch (error) {
            if (error.status !== 401) formErrors.show(error);
          }
        },
      },
      field("Provider", provider),
      field("Tokens", tokens),
      h("button", { type: "submit", text: "Buy tokens" }),
    );
    return section("Buy tokens", formErrors.element, form, done);
  }

  const poller = poll(refresh, REFRESH_MS, (error) => errors.show(error));
  return { destroy: () => poller.stop() };
}
