// Refreshes the live part of a dashboard page (<main data-refresh="N">)
// every N seconds from the same address with ?partial=1, which the broker
// answers with that part alone, rendered and escaped on the server. The
// page's own refreshing does not count as the admin's activity: an
// unattended page logs out after the idle timeout and goes to the login.
(function () {
  'use strict';
  var main = document.getElementById('live');
  if (!main || !main.dataset.refresh) {
    return;
  }
  var period = Math.max(1, Number(main.dataset.refresh)) * 1000;
  var updated = document.getElementById('updated');
  var conn = document.getElementById('conn');

  function partialURL() {
    var u = new URL(window.location.href);
    u.searchParams.set('partial', '1');
    return u.toString();
  }

  function refresh() {
    if (document.hidden) {
      window.setTimeout(refresh, period);
      return;
    }
    fetch(partialURL(), { credentials: 'same-origin', cache: 'no-store', redirect: 'error' })
      .then(function (r) {
        if (r.status === 401) {
          window.location.assign('/login?m=expired');
          return null;
        }
        return r.text().then(function (html) { return { ok: r.ok, status: r.status, html: html }; });
      })
      .then(function (res) {
        if (!res) {
          return;
        }
        if (!res.ok && res.status !== 404) {
          throw new Error('HTTP ' + res.status);
        }
        // Keep open what the admin opened.
        var open = Array.prototype.map.call(main.querySelectorAll('details[open][id]'), function (d) { return d.id; });
        main.innerHTML = res.html;
        open.forEach(function (id) {
          var d = document.getElementById(id);
          if (d) {
            d.open = true;
          }
        });
        if (updated) {
          updated.textContent = new Date().toISOString().substring(11, 19) + 'Z';
        }
        if (conn) {
          conn.textContent = '';
        }
        window.setTimeout(refresh, period);
      })
      .catch(function (e) {
        if (conn) {
          conn.textContent = 'Refresh failed (' + e.message + '); retrying.';
        }
        window.setTimeout(refresh, period);
      });
  }
  window.setTimeout(refresh, period);
})();
