// Time-series charts on uPlot (vendored, pinned: see vendor/README.md). A chart is a figure
// with a caption; the numbers behind it are in the table beside it, for screen readers.

import uPlot from "./vendor/uPlot.esm.js";
import { h } from "./dom.js";

// Distinguishable colours with at least 4.5:1 contrast on white. Each provider keeps its own;
// red and green are left to refused and allowed.
const PROVIDER_COLOURS = { openai: "#1f4fa0", qwen: "#8a4b00", gemini: "#6b3fa0" };
const MODEL_COLOURS = ["#00636b", "#5c5c5c", "#9c2f7a", "#3d5a00", "#004f8c", "#7a5200"];

// A colour per series, stable across refreshes: the provider's for its model-less series, the
// next model colour for each (provider, model) in the order they come.
export function seriesColours(series) {
  let next = 0;
  return series.map((s) => {
    if (!s.model && PROVIDER_COLOURS[s.provider]) return PROVIDER_COLOURS[s.provider];
    const colour = MODEL_COLOURS[next % MODEL_COLOURS.length];
    next += 1;
    return colour;
  });
}
export const ALLOWED_COLOUR = "#1d6b34";
export const REFUSED_COLOUR = "#a4262c";
const SPIKE_FILL = "rgba(164, 38, 44, 0.14)";
const SPIKE_EDGE = "#a4262c";
// Counts are whole: ticks at 1, 2, 5 x 10^n only.
const WHOLE_STEPS = Array.from({ length: 12 }, (_, n) => [1, 2, 5].map((m) => m * 10 ** n)).flat();

// Overlapping spikes (one anomaly window, asked per provider a few ms apart) share one band
// and one label.
function bands(spikes) {
  const merged = [];
  for (const spike of [...spikes].sort((a, b) => a.start - b.start)) {
    const last = merged[merged.length - 1];
    if (last && spike.start <= last.end) {
      last.end = Math.max(last.end, spike.end);
      last.labels.push(spike.label);
    } else {
      merged.push({ start: spike.start, end: spike.end, labels: [spike.label] });
    }
  }
  return merged.map((b) => ({ ...b, label: b.labels.join(", ") }));
}

function drawSpikes(u, spikes) {
  if (!spikes.length) return;
  const { ctx } = u;
  const { top, height } = u.bbox;
  ctx.save();
  for (const spike of bands(spikes)) {
    const x0 = u.valToPos(spike.start, "x", true);
    const x1 = u.valToPos(spike.end, "x", true);
    const left = Math.max(u.bbox.left, Math.min(x0, x1));
    const width = Math.max(2, Math.abs(x1 - x0));
    ctx.fillStyle = SPIKE_FILL;
    ctx.fillRect(left, top, width, height);
    ctx.strokeStyle = SPIKE_EDGE;
    ctx.lineWidth = 2 * uPlot.pxRatio;
    ctx.strokeRect(left, top, width, height);
    ctx.fillStyle = SPIKE_EDGE;
    ctx.font = `${12 * uPlot.pxRatio}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    const label = `spike: ${spike.label}`;
    const room = left - u.bbox.left > ctx.measureText(label).width + 8 * uPlot.pxRatio;
    ctx.textAlign = room ? "right" : "left"; // beside the band, or inside it near the y axis
    const x = room ? left - 4 * uPlot.pxRatio : left + width + 4 * uPlot.pxRatio;
    ctx.fillText(label, x, top + 4 * uPlot.pxRatio);
  }
  ctx.restore();
}

// A line chart whose series can change between refreshes (providers and models appear).
export class TimeChart {
  constructor(caption, description, { height = 240, yLabel = "" } = {}) {
    this.height = height;
    this.yLabel = yLabel;
    this.spikes = [];
    this.plot = null;
    this.key = "";
    this.canvasBox = h("div", { class: "chart", role: "img", "aria-label": description });
    this.element = h("figure", { class: "chart-figure" }, h("figcaption", { text: caption }), this.canvasBox);
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(this.element);
  }

  width() {
    return Math.max(260, Math.floor(this.element.clientWidth || 600));
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: this.height });
  }

  // series: [{label, colour, values}] ; xs: epoch seconds of each bucket's start
  update(xs, series, spikes = []) {
    this.spikes = spikes;
    this.canvasBox.dataset.spikes = spikes.map((s) => s.provider).join(" ");
    const key = series.map((s) => `${s.label}|${s.colour}`).join(";");
    const data = [xs, ...series.map((s) => s.values)];
    if (this.plot && key === this.key) {
      this.plot.setData(data);
      this.plot.redraw(false, false);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.key = key;
    const options = {
      width: this.width(),
      height: this.height,
      series: [
        {},
        ...series.map((s) => ({
          label: s.label,
          stroke: s.colour,
          width: 2,
          points: { show: xs.length < 80 },
          value: (_, v) => (v == null ? "—" : Math.round(v).toLocaleString("en")),
        })),
      ],
      axes: [
        { stroke: "#333", grid: { stroke: "#e3e3e3" } },
        { stroke: "#333", grid: { stroke: "#e3e3e3" }, label: this.yLabel, size: 70, incrs: WHOLE_STEPS },
      ],
      scales: { y: { range: (_, min, max) => [0, Math.max(1, max * 1.1)] } },
      cursor: { drag: { x: false, y: false } },
      hooks: { draw: [(u) => drawSpikes(u, this.spikes)] },
    };
    this.plot = new uPlot(options, data, this.canvasBox);
  }

  destroy() {
    this.resizer.disconnect();
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}
