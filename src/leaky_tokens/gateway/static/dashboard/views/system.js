// System (ADMIN): each upstream's health and circuit breaker (the gateway's GET /health), the
// token service's outbox backlog (GET /api/v1/tokens/admin/outbox) and analytics' consumer lag
// (GET /api/v1/analytics/admin/consumers).

import { call } from "../api.js";
import { fmtInt, fmtTime, h } from "../dom.js";
import { REFRESH_MS, dataTable, errorBox, num, numCol, poll, rowHeader, section, updatedStamp } from "../widgets.js";

export function mount(root) {
  const errors = errorBox();
  const stamp = updatedStamp();
  const overall = h("p", { class: "overall", id: "system-overall" });
  const upstreams = dataTable("Upstreams", ["Service", "Health", numCol("Latency (ms)"), "Breaker", numCol("Failure rate"), numCol("Calls in window")], { id: "upstream-table" });
  const pipeline = dataTable("Event pipeline", ["Measure", numCol("Value")], { id: "pipeline-table" });
  root.append(
    h("div", { class: "toolbar" }, stamp.element),
    errors.element,
    overall,
    upstreams.element,
    section("Usage events: tokens → analytics", pipeline.element),
  );

  async function refresh() {
    const [health, outbox, lag] = await Promise.all([
      call("/health", { accept: [503] }),
      call("/api/v1/tokens/admin/outbox"),
      call("/api/v1/analytics/admin/consumers"),
    ]);
    overall.replaceChildren(h("span", { class: `badge ${health.status === "UP" ? "up" : "down"}`, text: health.status }), " gateway and its upstreams");
    const breakers = health.circuitBreakers || {};
    upstreams.setRows(
      Object.entries(health.services || {}).map(([name, s]) => {
        const breaker = breakers[name] || {};
        return [
          rowHeader(name),
          h("span", { class: `badge ${s.status === "UP" ? "up" : "down"}`, text: s.detail ? `${s.status} (${s.detail})` : s.status }),
          num(s.latencyMs ?? "—"),
          h("span", { class: `badge breaker-${String(breaker.state || "").toLowerCase()}`, text: breaker.state || "—" }),
          num(breaker.failureRate === undefined ? "—" : `${Math.round(breaker.failureRate * 100)}%`),
          num(breaker.callsInWindow ?? "—"),
        ];
      }),
    );
    pipeline.setRows([
      [rowHeader("Outbox backlog (events not yet sent)"), num(fmtInt(outbox.unpublished))],
      [rowHeader("Oldest unsent event"), outbox.oldestUnpublishedAt ? `${fmtTime(outbox.oldestUnpublishedAt)} (${outbox.oldestUnpublishedAgeSeconds} s ago)` : "none"],
      [rowHeader(`Consumer lag (${lag.transports.join(", ")})`), num(fmtInt(lag.total))],
      ...Object.entries(lag.lag).map(([stream, n]) => [rowHeader(`  stream ${stream}`), num(fmtInt(n))]),
    ]);
    errors.clear();
    stamp.mark();
  }

  const poller = poll(refresh, REFRESH_MS, (error) => errors.show(error));
  return { destroy: () => poller.stop() };
}
