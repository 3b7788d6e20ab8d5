/* celery_stepped tree page: while anything in the tree is open, ask for its JSON every
 * interval; when the tree changed, fetch this page again and swap in the new tree (no
 * full-page reload, one place that draws trees: the server's template). Stops once every
 * action is final. Plain JavaScript, no dependencies. */
(function () {
  "use strict";
  var live = document.getElementById("stepped-live");
  if (!live || live.dataset.open !== "yes") return;
  var FINAL = (live.dataset.final || "").split(" ");
  var every = Number(live.dataset.interval) || 1000;
  var seen = null;
  var polls = 0;

  function open(node) {
    if (FINAL.indexOf(node.status) < 0) return true;
    return (node.steps || []).some(function (step) {
      return step.members.some(function (m) { return m.action && m.action.status && open(m.action); });
    });
  }

  function fingerprint(tree) {
    // Durations grow on every poll; they alone are no reason to redraw.
    return JSON.stringify(tree, function (key, value) {
      return key === "duration_seconds" ? undefined : value;
    });
  }

  function typing() {
    // Never redraw under a person filling in a completion form.
    var tree = document.getElementById("stepped-tree");
    var active = document.activeElement;
    if (tree && active && active !== document.body && tree.contains(active)) return true;
    return Array.prototype.some.call(
      document.querySelectorAll("#stepped-tree input[name=token]"),
      function (input) { return input.value !== ""; });
  }

  function say(text, state) {
    live.textContent = text;
    live.className = "live " + state;
  }

  function redraw() {
    return fetch(window.location.pathname, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("stepped-tree");
        var current = document.getElementById("stepped-tree");
        if (!fresh || !current) return;
        // Keep what a person opened (a traceback, a form) open in the new tree.
        current.querySelectorAll("details[open][data-keep]").forEach(function (opened) {
          var same = fresh.querySelector('details[data-keep="' + opened.dataset.keep + '"]');
          if (same) same.open = true;
        });
        current.replaceWith(document.importNode(fresh, true));
      });
  }

  function poll() {
    polls += 1;
    fetch(live.dataset.poll, { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (tree) {
        var print = fingerprint(tree);
        var still = open(tree);
        var due = print !== seen || (still && polls % 5 === 0);
        if (due && typing()) {
          say("Live: paused while you fill in a form.", "open");
          return still;
        }
        var drawn = due ? redraw().then(function () { seen = print; }) : Promise.resolve();
        return drawn.then(function () { return still; });
      })
      .then(function (still) {
        if (still) {
          if (!typing()) say("Live: actions in this tree are still open.", "open");
          window.setTimeout(poll, every);
        } else {
          say("Final: every action in this tree has finished.", "final");
        }
      })
      .catch(function (error) {
        say("Live: the last update failed (" + error.message + "); trying again.", "stale");
        window.setTimeout(poll, every * 3);
      });
  }

  window.setTimeout(poll, every);
})();
