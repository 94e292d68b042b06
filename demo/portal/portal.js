/* mod_cardscan demo portal: fetch a CardScan session token from
 * /cardscan-session (same origin, Apache's own authentication) and show what
 * came back. No frameworks, no external requests. */
(function () {
  "use strict";

  var $ = function (id) { return document.getElementById(id); };
  var timer = null;

  function setStatus(text, cls) {
    var el = $("status");
    el.textContent = text;
    el.className = cls || "";
  }

  function showError(code, message, httpStatus) {
    var box = $("error");
    box.textContent = "";
    var c = document.createElement("code");
    c.textContent = code;
    box.appendChild(c);
    box.appendChild(document.createTextNode(
      " (HTTP " + httpStatus + "): " + (message || "no message")));
    box.setAttribute("data-error", code);
    box.hidden = false;
    $("widget-note").textContent = "No session token, so no widget: see the error above.";
  }

  function clearFields() {
    ["user", "identity", "expires", "token"].forEach(function (id) { $(id).textContent = "–"; });
    $("expires").removeAttribute("data-expires-at");
    $("expires").removeAttribute("title");
    $("countdown").textContent = "";
    $("error").hidden = true;
    $("error").removeAttribute("data-error");
    $("cardscan-widget").setAttribute("data-session-token", "");
    $("widget-note").textContent = "Waiting for a session token…";
    if (timer) { clearInterval(timer); timer = null; }
  }

  /* The JWT payload (middle part, base64url JSON); null when it is not one. */
  function jwtPayload(token) {
    try {
      var part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      while (part.length % 4) part += "=";
      var bin = atob(part), bytes = new Uint8Array(bin.length);
      for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      return JSON.parse(new TextDecoder("utf-8").decode(bytes));
    } catch (e) {
      return null;
    }
  }

  function fmtLeft(ms) {
    var s = Math.max(0, Math.floor(ms / 1000));
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    var two = function (n) { return (n < 10 ? "0" : "") + n; };
    return (h ? h + ":" + two(m) : m) + ":" + two(r);
  }

  function startCountdown(expiresAt) {
    function tick() {
      var left = expiresAt.getTime() - Date.now();
      if (left <= 0) {
        $("countdown").textContent = "(expired: get a new token)";
        setStatus("token expired", "bad");
        clearInterval(timer);
        timer = null;
      } else {
        $("countdown").textContent = "(in " + fmtLeft(left) + ")";
      }
    }
    tick();
    timer = setInterval(tick, 1000);
  }

  function show(data) {
    var payload = jwtPayload(data.Token || "");
    $("user").textContent = payload && typeof payload.sub === "string" ? payload.sub : "(no sub in the token)";
    $("identity").textContent = data.IdentityId || "–";
    $("token").textContent = data.Token ? data.Token.slice(0, 24) + "… (" + data.Token.length + " characters)" : "–";
    if (data.expires_at) {
      var when = new Date(data.expires_at);
      $("expires").textContent = when.toLocaleString();
      $("expires").setAttribute("data-expires-at", data.expires_at);
      $("expires").title = data.expires_at + " (UTC)";
      startCountdown(when);
    } else {
      $("expires").textContent = "(no expiry given)";
    }
    var widget = $("cardscan-widget");
    widget.setAttribute("data-session-token", data.Token || "");
    $("widget-note").textContent =
      "With this session token the CardScan.ai web widget (for example the React " +
      "CardScanView with sessionToken={token}) would mount here.";
    setStatus("session token received", "ok");
  }

  function load() {
    clearFields();
    setStatus("requesting a session token…");
    $("refresh").disabled = true;
    // location.origin, not a relative URL: a page opened as
    // http://user:pw@host/ would otherwise make fetch() refuse the URL.
    fetch(location.origin + "/cardscan-session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Accept": "application/json" }
    }).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        try { data = JSON.parse(text); } catch (e) { /* not JSON: handled below */ }
        if (res.ok && data && data.Token) {
          show(data);
        } else if (data && data.error) {
          setStatus("failed", "bad");
          showError(data.error, data.message, res.status);
        } else {
          setStatus("failed", "bad");
          showError("bad_reply", "the server's reply was not the expected JSON", res.status);
        }
      });
    }).catch(function (err) {
      setStatus("failed", "bad");
      showError("network_error", String(err), 0);
    }).then(function () {
      $("refresh").disabled = false;
    });
  }

  $("refresh").addEventListener("click", load);
  load();
})();
