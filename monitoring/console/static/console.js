// The console's only script (the CSP allows no inline script).
// Auto-refresh: every data-refresh seconds, fetch this page's own URL again (so its filters and
// page stay) and swap in the new #live part, unless the operator is busy with it (a ticked box,
// a focused field) or the tab is hidden. And "select all" checkboxes.
(function () {
  "use strict";

  function busy(live) {
    var active = document.activeElement;
    if (active && live.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) return true;
    return live.querySelector("input[type=checkbox]:checked") !== null;
  }

  function refresh() {
    var live = document.getElementById("live");
    if (!live || document.hidden || busy(live)) return;
    fetch(location.href, { credentials: "same-origin", headers: { "X-Console-Refresh": "1" } })
      .then(function (response) {
        if (response.redirected || response.status === 403) {
          location.reload(); // the session ended: show the login page
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (!html) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        if (fresh && !busy(live)) live.innerHTML = fresh.innerHTML;
      })
      .catch(function () { /* the monitor restarting: try again next time */ });
  }

  document.addEventListener("change", function (event) {
    var target = event.target;
    var name = target.getAttribute && target.getAttribute("data-select-all");
    if (!name || !target.form) return;
    target.form.querySelectorAll('input[type=checkbox][name="' + name + '"]').forEach(function (box) {
      box.checked = target.checked;
    });
  });

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    var every = live ? parseInt(live.getAttribute("data-refresh"), 10) : 0;
    if (every > 0) setInterval(refresh, every * 1000);
  });
})();
