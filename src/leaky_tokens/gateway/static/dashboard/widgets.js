// Pieces several views share: the window picker, tables, live refresh and error notices.

import { ApiError } from "./api.js";
import { append, clear, h, uniqueId } from "./dom.js";

export const PROVIDERS = ["openai", "qwen", "gemini"];
export const REFRESH_MS = 5000;

// The usage windows, each with the anomaly window that suits it.
export const WINDOWS = [
  { minutes: 60, label: "1 hour", anomalyMinutes: 5 },
  { minutes: 1440, label: "24 hours", anomalyMinutes: 60 },
  { minutes: 10080, label: "7 days", anomalyMinutes: 1440 },
];

export function windowOf(minutes) {
  return WINDOWS.find((w) => w.minutes === minutes) || WINDOWS[0];
}

export function windowPicker(prefs, onChange) {
  const name = uniqueId("window");
  return h(
    "fieldset",
    { class: "window-picker" },
    h("legend", { text: "Window" }),
    WINDOWS.map((w) => {
      const id = `${name}-${w.minutes}`;
      const input = h("input", {
        type: "radio",
        name,
        id,
        value: String(w.minutes),
        checked: prefs.windowMinutes === w.minutes,
        onchange: () => {
          prefs.windowMinutes = w.minutes;
          onChange(w);
        },
      });
      return h("span", { class: "choice" }, input, h("label", { for: id, text: w.label }));
    }),
  );
}

// A table inside a focusable scrolling region (wide tables scroll on a narrow screen, and a
// keyboard user can scroll them too).
export function dataTable(caption, columns, { id } = {}) {
  const tbody = h("tbody");
  const table = h(
    "table",
    { id },
    h("caption", { text: caption }),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", text: c.text ?? c, class: c.numeric ? "num" : undefined })))),
    tbody,
  );
  const region = h("div", { class: "table-scroll", role: "region", "aria-label": caption, tabindex: "0" }, table);
  return {
    element: region,
    table,
    setRows(rows, emptyText = "Nothing yet.") {
      clear(tbody);
      if (!rows.length) {
        tbody.append(h("tr", {}, h("td", { colspan: String(columns.length), class: "empty", text: emptyText })));
        return;
      }
      for (const cells of rows) {
        tbody.append(
          h(
            "tr",
            {},
            cells.map((cell) => {
              if (cell && cell.header) return h("th", { scope: "row" }, cell.content);
              if (cell && cell.numeric) return h("td", { class: "num" }, cell.content);
              return h("td", {}, cell instanceof Node ? cell : cell === null || cell === undefined ? "—" : String(cell));
            }),
          ),
        );
      }
    },
  };
}

export const num = (value) => ({ numeric: true, content: value });
// A column of numbers (its heading is aligned with them).
export const numCol = (text) => ({ text, numeric: true });
export const rowHeader = (content) => ({ header: true, content });

export function messageOf(error) {
  if (error instanceof ApiError) {
    if (error.status === 403) return "You may not see this (the API answered 403 Forbidden).";
    const details = (error.body && error.body.details) || [];
    const fields = details.map((d) => `${d.field}: ${d.message}`).join("; ");
    return fields ? `${error.message} (${fields})` : error.message;
  }
  return "The server could not be reached. Retrying…";
}

// A place for a view's errors: announced, and cleared by the next success.
export function errorBox() {
  const box = h("div", { class: "error", role: "alert", hidden: true });
  return {
    element: box,
    show(error) {
      box.hidden = false;
      box.textContent = messageOf(error);
    },
    clear() {
      box.hidden = true;
      box.textContent = "";
    },
  };
}

// Run `task` now and again `every` ms after each run ends, until stopped. An expired session
// (401) stops it: the app is already back at sign-in.
export function poll(task, every, onError) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    if (stopped) return;
    try {
      await task();
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        stopped = true;
        return;
      }
      if (!stopped) onError(error);
    }
    if (!stopped) timer = setTimeout(run, every);
  };
  run();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
    now() {
      clearTimeout(timer);
      run();
    },
  };
}

export function field(labelText, control, hint) {
  const id = control.id || uniqueId("field");
  control.id = id;
  const parts = [h("label", { for: id, text: labelText }), control];
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("span", { class: "hint", id: hintId, text: hint }));
  }
  return h("div", { class: "field" }, parts);
}

export function providerSelect(attrs = {}) {
  return h("select", { name: "provider", ...attrs }, PROVIDERS.map((p) => h("option", { value: p, text: p })));
}

export function section(title, ...children) {
  const id = uniqueId("section");
  return append(h("section", { "aria-labelledby": id }, h("h3", { id, text: title })), children);
}

export function updatedStamp() {
  const el = h("p", { class: "updated" });
  return {
    element: el,
    mark() {
      el.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every ${REFRESH_MS / 1000} s`;
    },
  };
}
