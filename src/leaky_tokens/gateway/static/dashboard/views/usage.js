// Usage over time: tokens per provider (and model), requests allowed vs refused, anomalies
// marked on the chart. Calls GET /api/v1/analytics/timeseries and, per provider,
// GET /api/v1/analytics/anomalies — both scoped by the API (a USER sees their own events).
// When the window holds events that name a model (calls of the /v1 API), a per-model table
// from GET /api/v1/analytics/report?byModel=true (token kinds, p50/p95 latency) appears.

import { call } from "../api.js";
import { ALLOWED_COLOUR, REFUSED_COLOUR, TimeChart, seriesColours } from "../charts.js";
import { fmtInt, h, replace } from "../dom.js";
import {
  PROVIDERS,
  REFRESH_MS,
  dataTable,
  errorBox,
  num,
  numCol,
  poll,
  rowHeader,
  section,
  updatedStamp,
  windowOf,
  windowPicker,
} from "../widgets.js";

const seconds = (iso) => Date.parse(iso) / 1000;
const seriesLabel = (s) => (s.model ? `${s.provider} · ${s.model}` : s.provider);

export function mount(root, ctx) {
  const errors = errorBox();
  const stamp = updatedStamp();
  const tokensChart = new TimeChart(
    "Tokens per provider and model",
    "Line chart of tokens asked for per provider and model in each time bucket; the table below holds the totals.",
    { yLabel: "tokens" },
  );
  const requestsChart = new TimeChart(
    "Requests: allowed and refused",
    "Line chart of allowed and refused requests in each time bucket; the table below holds the totals.",
    { yLabel: "requests", height: 200 },
  );
  const anomalyList = h("ul", { class: "anomalies", id: "anomaly-list" });
  const totals = dataTable(
    "Totals for the window",
    ["Provider", "Model", numCol("Requests"), numCol("Allowed"), numCol("Refused"), numCol("Tokens"), numCol("Allowed tokens")],
    { id: "usage-totals" },
  );
  const models = dataTable(
    "Per model",
    [
      "Provider",
      "Model",
      numCol("Requests"),
      numCol("Prompt tokens"),
      numCol("Completion tokens"),
      numCol("Tokens"),
      numCol("p50 latency (ms)"),
      numCol("p95 latency (ms)"),
    ],
    { id: "usage-models" },
  );
  models.element.hidden = true;
  let poller;
  const picker = windowPicker(ctx.prefs, () => poller.now());

  root.append(
    h("div", { class: "toolbar" }, picker, stamp.element),
    errors.element,
    section("Anomalies", h("p", { class: "hint", text: "Tokens of the latest anomaly window against the windows before it (2× or more is a spike)." }), anomalyList),
    h("div", { class: "charts" }, tokensChart.element, requestsChart.element),
    totals.element,
    models.element,
  );

  async function refresh() {
    const window = windowOf(ctx.prefs.windowMinutes);
    const [series, ...verdicts] = await Promise.all([
      call("/api/v1/analytics/timeseries", { query: { windowMinutes: window.minutes } }),
      ...PROVIDERS.map((provider) =>
        call("/api/v1/analytics/anomalies", {
          query: { provider, windowMinutes: window.anomalyMinutes, baselineWindows: 3, threshold: 2 },
        }),
      ),
    ]);
    // The per-model table, only when some event names a model (the report's window is at most
    // 24 h: the 7-day view shows the last 24 h there).
    const modelled = PROVIDERS.filter((p) => series.series.some((s) => s.provider === p && s.model));
    const reports = await Promise.all(
      modelled.map((provider) =>
        call("/api/v1/analytics/report", {
          query: { provider, windowMinutes: Math.min(window.minutes, 1440), byModel: true },
        }),
      ),
    );
    const modelRows = reports.flatMap((r) =>
      r.byModel
        .filter((m) => m.model)
        .map((m) => [
          rowHeader(r.provider),
          m.model,
          num(fmtInt(m.totalEvents)),
          num(fmtInt(m.promptTokens)),
          num(fmtInt(m.completionTokens)),
          num(fmtInt(m.totalTokens)),
          num(m.p50LatencyMs === null ? "—" : fmtInt(m.p50LatencyMs)),
          num(m.p95LatencyMs === null ? "—" : fmtInt(m.p95LatencyMs)),
        ]),
    );
    models.element.hidden = modelRows.length === 0;
    models.setRows(modelRows, "No model named in this window.");
    const xs = series.buckets.map(seconds);
    const spikes = verdicts
      .filter((v) => v.anomaly)
      .map((v) => ({
        provider: v.provider,
        start: seconds(v.currentWindowStart),
        end: seconds(v.currentWindowEnd),
        label: `${v.provider} ×${v.ratio}`,
      }));
    const colours = seriesColours(series.series);
    tokensChart.update(
      xs,
      series.series.map((s, i) => ({ label: seriesLabel(s), colour: colours[i], values: s.tokens })),
      spikes,
    );
    const allowed = xs.map((_, i) => series.series.reduce((sum, s) => sum + s.allowedRequests[i], 0));
    const refused = xs.map((_, i) => series.series.reduce((sum, s) => sum + s.requests[i] - s.allowedRequests[i], 0));
    requestsChart.update(xs, [
      { label: "allowed", colour: ALLOWED_COLOUR, values: allowed },
      { label: "refused", colour: REFUSED_COLOUR, values: refused },
    ]);
    totals.setRows(
      series.series.map((s) => [
        rowHeader(s.provider),
        s.model || "—",
        num(fmtInt(s.totals.requests)),
        num(fmtInt(s.totals.allowedRequests)),
        num(fmtInt(s.totals.refusedRequests)),
        num(fmtInt(s.totals.tokens)),
        num(fmtInt(s.totals.allowedTokens)),
      ]),
      "No usage in this window.",
    );
    replace(
      anomalyList,
      verdicts.map((v) =>
        h(
          "li",
          { class: v.anomaly ? "spike" : "calm", "data-provider": v.provider },
          h("strong", { text: v.anomaly ? `Spike on ${v.provider}` : `${v.provider}: no spike` }),
          ` — ${fmtInt(v.currentTokens)} tokens in the last ${v.windowMinutes} min, ` +
            `${v.ratio}× the baseline average of ${fmtInt(Math.round(v.baselineAverage))}.`,
        ),
      ),
    );
    errors.clear();
    stamp.mark();
  }

  poller = poll(refresh, REFRESH_MS, (error) => errors.show(error));
  return {
    destroy() {
      poller.stop();
      tokensChart.destroy();
      requestsChart.destroy();
    },
  };
}
