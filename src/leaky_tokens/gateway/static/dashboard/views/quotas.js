// Quota pools: total, remaining (a meter), reset time. Calls GET /api/v1/tokens/quotas (a USER:
// their own and their organisations' pools; an ADMIN: every pool); an ADMIN sets a quota with
// PUT /api/v1/tokens/quota or /quota/org.

import { call, currentSession, isAdmin } from "../api.js";
import { announce, fmtInt, fmtTime, h } from "../dom.js";
import { dataTable, errorBox, field, num, numCol, providerSelect, rowHeader, section } from "../widgets.js";

const PAGE_SIZE = 50;
// The purchased credit of issue 10's ledger, under whichever name the quota read gives it.
const creditOf = (pool) => pool.creditTokens ?? pool.purchasedTokens ?? pool.creditRemainingTokens;

function meter(pool) {
  const total = Math.max(pool.totalTokens, 0);
  const remaining = Math.max(0, Math.min(pool.remainingTokens, total || pool.remainingTokens));
  const percent = total ? Math.round((remaining / total) * 100) : 0;
  const text = `${fmtInt(pool.remainingTokens)} of ${fmtInt(pool.totalTokens)} left (${percent}%)`;
  return h(
    "span",
    { class: "fill" },
    h("meter", {
      min: "0",
      max: String(total || 1),
      low: String(total * 0.2),
      high: String(total * 0.5),
      optimum: String(total),
      value: String(remaining),
      "aria-label": `${pool.kind} ${pool.ownerId} ${pool.provider}: ${text}`,
    }),
    h("span", { class: "fill-text", text }),
  );
}

export function mount(root) {
  const errors = errorBox();
  const pools = dataTable("Quota pools", ["Owner", "Provider", numCol("Total"), "Remaining", "Resets at"], { id: "quota-table" });
  const pager = h("div", { class: "pager" });
  let page = 1;
  root.append(errors.element, pools.element, pager);

  const me = currentSession().userId;
  const ownerText = (pool) =>
    `${pool.kind === "org" ? "Organisation" : "User"} ${pool.ownerId}${pool.ownerId === me ? " (you)" : ""}`;

  async function load() {
    try {
      const body = await call("/api/v1/tokens/quotas", { query: { page, page_size: PAGE_SIZE } });
      const hasCredit = body.items.some((p) => creditOf(p) !== undefined);
      pools.setRows(
        body.items.map((p) => [
          rowHeader(ownerText(p)),
          p.provider,
          num(fmtInt(p.totalTokens)),
          h("span", {}, meter(p), hasCredit && creditOf(p) !== undefined ? ` + ${fmtInt(creditOf(p))} purchased` : ""),
          fmtTime(p.resetAt),
        ]),
        isAdmin() ? "No quota pool exists yet." : "You have no quota pool yet. Ask an ADMIN for one, or buy tokens.",
      );
      const pages = body.pagination.total_pages;
      pager.replaceChildren();
      if (pages > 1) {
        pager.append(
          h("button", { type: "button", class: "secondary", disabled: page <= 1, text: "Previous page", onclick: () => { page -= 1; load(); } }),
          h("span", { text: ` Page ${page} of ${pages} ` }),
          h("button", { type: "button", class: "secondary", disabled: page >= pages, text: "Next page", onclick: () => { page += 1; load(); } }),
        );
      }
      errors.clear();
    } catch (error) {
      if (error.status !== 401) errors.show(error);
    }
  }

  if (isAdmin()) root.append(adminForm(load));
  load();
  return { destroy() {} };
}

function adminForm(reload) {
  const formErrors = errorBox();
  const done = h("p", { class: "success", role: "status" });
  const kind = h("select", { name: "kind" }, h("option", { value: "user", text: "User" }), h("option", { value: "org", text: "Organisation" }));
  const owner = h("input", { name: "ownerId", required: true, autocomplete: "off", value: currentSession().userId, size: "38" });
  const provider = providerSelect();
  const total = h("input", { name: "totalTokens", type: "number", min: "0", step: "1", required: true, value: "100000" });
  const remaining = h("input", { name: "remainingTokens", type: "number", min: "0", step: "1" });
  const form = h(
    "form",
    {
      class: "stacked",
      "aria-label": "Set a quota",
      onsubmit: async (event) => {
        event.preventDefault();
        formErrors.clear();
        done.textContent = "";
        const isOrg = kind.value === "org";
        const body = {
          [isOrg ? "orgId" : "userId"]: owner.value.trim(),
          provider: provider.value,
          totalTokens: Number(total.value),
        };
        if (remaining.value !== "") body.remainingTokens = Number(remaining.value);
        try {
          const saved = await call(isOrg ? "/api/v1/tokens/quota/org" : "/api/v1/tokens/quota", { method: "PUT", body });
          done.textContent = `Saved: ${saved.provider} pool of ${fmtInt(saved.totalTokens)} tokens, ${fmtInt(saved.remainingTokens)} remaining.`;
          announce(done.textContent);
          reload();
        } catch (error) {
          if (error.status !== 401) formErrors.show(error);
        }
      },
    },
    field("Pool of", kind),
    field("Owner id", owner, "The user's or organisation's id."),
    field("Provider", provider),
    field("Total tokens", total),
    field("Remaining tokens", remaining, "Leave empty to start the pool full."),
    h("button", { type: "submit", text: "Set quota" }),
  );
  return section("Set a quota (ADMIN)", formErrors.element, form, done);
}
