// Live parts of the console: an element with data-refresh="<url>" reloads its inner HTML from
// that URL every data-every milliseconds (polling a server-rendered fragment). Polling pauses
// while the tab is hidden; a session that ended sends the page back to the login form.
"use strict";

(function () {
  function follow(element) {
    const url = element.dataset.refresh;
    const every = Number(element.dataset.every || 2500);
    const status = document.getElementById("live-status");
    let busy = false;

    async function refresh() {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const response = await fetch(url, {
          credentials: "same-origin",
          headers: { "X-Requested-With": "fetch" },
          cache: "no-store",
        });
        if (response.redirected || response.status === 401 || response.status === 403) {
          window.location.assign("/console/login");
          return;
        }
        if (!response.ok) throw new Error(String(response.status));
        element.innerHTML = await response.text();
        if (status) {
          status.textContent = "live · updated " + new Date().toLocaleTimeString();
          status.classList.remove("error-text");
        }
      } catch (error) {
        if (status) {
          status.textContent = "live updates paused: " + error.message;
          status.classList.add("error-text");
        }
      } finally {
        busy = false;
      }
    }

    window.setInterval(refresh, every);
    document.addEventListener("visibilitychange", refresh);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(follow);
  });
})();
