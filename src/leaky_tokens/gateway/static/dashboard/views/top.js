// Top users and organisations for the window. Calls GET /api/v1/analytics/top (a USER sees
// only their own usage, so only themselves and their organisations' pools).

import { call, currentSession } from "../api.js";
import { fmtInt, h } from "../dom.js";
import { REFRESH_MS, dataTable, errorBox, num, numCol, poll, rowHeader, updatedStamp, windowPicker } from "../widgets.js";

export function mount(root, ctx) {
  const errors = errorBox();
  const stamp = updatedStamp();
  const users = dataTable("Top users", ["User", numCol("Tokens"), numCol("Requests"), numCol("Allowed tokens")], { id: "top-users" });
  const orgs = dataTable("Top organisations", ["Organisation", numCol("Tokens"), numCol("Requests"), numCol("Allowed tokens")], { id: "top-orgs" });
  let poller;
  root.append(
    h("div", { class: "toolbar" }, windowPicker(ctx.prefs, () => poller.now()), stamp.element),
    errors.element,
    h("div", { class: "columns" }, users.element, orgs.element),
  );

  const me = currentSession().userId;
  const owner = (id) => (id === me ? `${id} (you)` : id);

  async function refresh() {
    const top = await call("/api/v1/analytics/top", { query: { windowMinutes: ctx.prefs.windowMinutes, limit: 10 } });
    users.setRows(
      top.topUsers.map((u) => [rowHeader(owner(u.userId)), num(fmtInt(u.totalTokens)), num(fmtInt(u.events)), num(fmtInt(u.allowedTokens))]),
      "No usage in this window.",
    );
    orgs.setRows(
      top.topOrgs.map((o) => [rowHeader(o.orgId), num(fmtInt(o.totalTokens)), num(fmtInt(o.events)), num(fmtInt(o.allowedTokens))]),
      "No organisation pool was charged in this window.",
    );
    errors.clear();
    stamp.mark();
  }

  poller = poll(refresh, REFRESH_MS, (error) => errors.show(error));
  return { destroy: () => poller.stop() };
}
