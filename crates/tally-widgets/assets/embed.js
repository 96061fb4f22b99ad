// Tally live counters: <span data-tally="NAME"></span> shows NAME's value and keeps it current,
// from Server-Sent Events, or by polling every 2 s where those are blocked.
(function () {
  "use strict";
  var script = document.currentScript;
  var base = script ? script.src.replace(/\/embed\.js(\?.*)?$/, "") : "";

  function show(element, value, full) {
    element.textContent = full ? value.toLocaleString("en-US") : metric(value);
    element.setAttribute("data-tally-value", String(value));
  }

  // 1234 -> "1.2k", as the badges write it: rounded down, never more than was counted.
  function metric(value) {
    var sign = value < 0 ? "-" : "";
    var magnitude = Math.abs(value);
    if (magnitude < 1000) return sign + magnitude;
    var prefixes = ["k", "M", "G", "T", "P", "E"];
    var unit = 1000;
    for (var i = 0; i < prefixes.length; i++) {
      if (magnitude < unit * 1000 || i === prefixes.length - 1) {
        var whole = Math.floor(magnitude / unit);
        if (whole < 10) {
          var tenths = Math.floor((magnitude % unit) * 10 / unit);
          return sign + whole + (tenths ? "." + tenths : "") + prefixes[i];
        }
        return sign + whole + prefixes[i];
      }
      unit *= 1000;
    }
  }

  function poll(element, url, full) {
    function once() {
      fetch(url, { cache: "no-store" })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (body) { if (body) show(element, body.value, full); })
        .catch(function () {})
        .then(function () { setTimeout(once, 2000); });
    }
    element.setAttribute("data-tally-mode", "polling");
    once();
  }

  function follow(element, name, origin, full) {
    var root = (origin === undefined ? base : origin) + "/v1/counters/" + encodeURIComponent(name);
    if (!window.EventSource || element.hasAttribute("data-tally-poll")) return poll(element, root, full);
    var source = new EventSource(root + "/events");
    var opened = false;
    element.setAttribute("data-tally-mode", "live");
    source.addEventListener("value", function (event) {
      opened = true;
      show(element, JSON.parse(event.data).value, full);
    });
    source.onerror = function () {
      // Never got through (a proxy that blocks streams): poll instead. After a value, let the
      // browser reconnect on its own.
      if (!opened) { source.close(); poll(element, root, full); }
    };
  }

  window.Tally = { follow: follow };
  function start() {
    var elements = document.querySelectorAll("[data-tally]");
    for (var i = 0; i < elements.length; i++) {
      var element = elements[i];
      if (element.hasAttribute("data-tally-mode")) continue;
      follow(element, element.getAttribute("data-tally"), undefined, element.getAttribute("data-tally-format") === "full");
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
