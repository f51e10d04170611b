// The dashboard's shell: sign-in, navigation between views (#/usage, #/keys, …) and the session.
// Each view lives in views/<name>.js and exports mount(root, ctx) -> {destroy()}.

import { ApiError, currentSession, isAdmin, onSessionChange, signIn, signOut } from "./api.js";
import { announce, h, replace } from "./dom.js";
import { errorBox, field } from "./widgets.js";
import * as usage from "./views/usage.js";
import * as top from "./views/top.js";
import * as quotas from "./views/quotas.js";
import * as keys from "./views/keys.js";
import * as purchases from "./views/purchases.js";
import * as system from "./views/system.js";

const VIEWS = [
  { id: "usage", label: "Usage", title: "Usage over time", module: usage },
  { id: "top", label: "Top users & orgs", title: "Top users and organisations", module: top },
  { id: "quotas", label: "Quotas", title: "Quotas", module: quotas },
  { id: "keys", label: "API keys", title: "API keys", module: keys },
  { id: "purchases", label: "Purchases", title: "Purchases", module: purchases },
  { id: "system", label: "System", title: "System", module: system, admin: true },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const navList = document.getElementById("nav-list");
const who = document.getElementById("who");
const whoName = document.getElementById("who-name");
const prefs = { windowMinutes: 60 };
let mounted = null;
let lastMessage = null;

function unmount() {
  if (mounted) mounted.destroy();
  mounted = null;
}

function routeId() {
  const hash = window.location.hash;
  return hash.startsWith("#/") ? hash.slice(2) : "";
}

function renderSignIn(message) {
  unmount();
  nav.hidden = true;
  who.hidden = true;
  document.title = "Sign in · Leaky Tokens dashboard";
  const errors = errorBox();
  const username = h("input", { name: "username", autocomplete: "username", required: true });
  const password = h("input", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", text: "Sign in" });
  const form = h(
    "form",
    {
      class: "stacked sign-in",
      "aria-labelledby": "sign-in-title",
      onsubmit: async (event) => {
        event.preventDefault();
        errors.clear();
        submit.disabled = true;
        try {
          await signIn(username.value.trim(), password.value);
        } catch (error) {
          submit.disabled = false;
          if (error instanceof ApiError && error.status === 401) {
            errors.show(new ApiError(401, { message: "Wrong username or password." }));
          } else {
            errors.show(error);
          }
          password.focus();
        }
      },
    },
    field("Username", username),
    field("Password", password),
    submit,
  );
  replace(
    main,
    h("h1", { id: "sign-in-title", text: "Sign in" }),
    message ? h("p", { class: "notice", role: "status", id: "session-message", text: message }) : null,
    errors.element,
    form,
    h("p", { class: "hint", text: "Use your Leaky Tokens account. The session lives in this tab only: reloading the page signs you out." }),
  );
  username.focus();
}

function renderNav(active) {
  replace(
    navList,
    VIEWS.filter((v) => !v.admin || isAdmin()).map((v) =>
      h("li", {}, h("a", { href: `#/${v.id}`, text: v.label, "aria-current": v.id === active ? "page" : undefined })),
    ),
  );
}

function render() {
  const session = currentSession();
  if (!session) {
    renderSignIn(lastMessage);
    return;
  }
  const view = VIEWS.find((v) => v.id === routeId()) || VIEWS[0];
  unmount();
  nav.hidden = false;
  who.hidden = false;
  whoName.textContent = `${session.username} (${isAdmin() ? "ADMIN" : "USER"})`;
  renderNav(view.id);
  document.title = `${view.title} · Leaky Tokens dashboard`;
  const heading = h("h1", { tabindex: "-1", text: view.title });
  const body = h("div", { class: "view", id: `view-${view.id}` });
  replace(main, heading, body);
  if (view.admin && !isAdmin()) {
    body.append(h("p", { class: "notice", text: "This view is for ADMINs." }));
  } else {
    mounted = view.module.mount(body, { prefs });
  }
  heading.focus({ preventScroll: true });
}

onSessionChange((session, reason) => {
  lastMessage = reason;
  if (!session && reason) announce(reason);
  if (session && routeId() === "") {
    window.location.hash = "#/usage"; // renders through hashchange
    return;
  }
  render();
});

window.addEventListener("hashchange", () => {
  if (routeId() || !window.location.hash) render();
});

document.getElementById("sign-out").addEventListener("click", () => {
  signOut("You have signed out.");
});

document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

render();
