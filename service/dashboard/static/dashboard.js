/* Prospect dashboard: draws the charts with the vendored uPlot and keeps them current by
 * polling the same-origin JSON endpoints under /dashboard/api (session cookie, no key).
 * No inline scripts (the pages' CSP forbids them): each page says what it is through
 * data-* attributes on <main>.
 *
 * window.prospectCharts[id] = {plot, data} exposes what each chart was given, so tests (and
 * curious operators in the console) can check the drawn numbers.
 */
(function () {
  "use strict";

  var charts = (window.prospectCharts = {});
  var COLORS = {
    up: "#1a7f37", down: "#cf222e", accent: "#3056d3", c2: "#8250df", c3: "#bf8700",
  };

  function setStatus(id, text) {
    var el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) {
          var here = location.pathname + location.search;
          location.assign("/dashboard/login?next=" + encodeURIComponent(here));
          throw new Error("session ended");
        }
        if (!r.ok) throw new Error(url.split("?")[0] + " answered " + r.status);
        return r.json();
      });
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number" && digits !== undefined) return v.toFixed(digits);
    return String(v);
  }

  function lookup(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  function width(el) {
    return Math.max(280, Math.floor(el.getBoundingClientRect().width || el.clientWidth || 600));
  }

  /* Create or update the uPlot chart in element `el`. */
  function draw(el, optsFn, data) {
    var entry = charts[el.id];
    if (entry) {
      entry.plot.setData(data);
      entry.data = data;
    } else {
      var opts = optsFn();
      opts.width = width(el);
      opts.height = opts.height || 220;
      var plot = new uPlot(opts, data, el);
      entry = charts[el.id] = { plot: plot, data: data };
    }
    el.dataset.ready = "1";
    el.dataset.points = String(data[0].length);
    return entry;
  }

  window.addEventListener("resize", function () {
    Object.keys(charts).forEach(function (id) {
      var el = document.getElementById(id);
      if (el) charts[id].plot.setSize({ width: width(el), height: charts[id].plot.height });
    });
  });

  function fillFields(state) {
    document.querySelectorAll("[data-field]").forEach(function (el) {
      var v = lookup(state, el.dataset.field);
      if (v === undefined) return;
      el.textContent = fmt(v, el.dataset.digits ? Number(el.dataset.digits) : undefined);
    });
  }

  function el(tag, attrs, children) {
    var n = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") n.textContent = attrs[k];
      else n.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { n.appendChild(c); });
    return n;
  }

  function badge(status) {
    return el("span", { class: "badge badge-" + status, text: status });
  }

  function progressNodes(job) {
    var bar = el("progress", { "data-role": "progress" });
    var text;
    if (job.total_steps) {
      bar.max = job.total_steps;
      bar.value = job.step;
      text = "step " + job.step + " / " + job.total_steps + " (" +
        Math.round(100 * job.progress) + " %)";
    } else {
      text = "step " + job.step + (job.status === "queued" ? " · waiting for a worker" : "");
    }
    return [bar, el("span", { class: "muted", "data-role": "progress-text", text: text })];
  }

  // ---- overview ------------------------------------------------------------------------

  function balanceOpts(bucketS) {
    var bars = uPlot.paths.bars;
    var pad = 0.6 * bucketS;  // room for the first and last buckets' side-by-side bars
    return {
      scales: { x: { time: true, range: function (u, min, max) { return [min - pad, max + pad]; } } },
      axes: [{}, { label: "events" }],
      series: [
        {},
        { label: "desirable", stroke: COLORS.up, fill: COLORS.up + "cc", width: 1,
          paths: bars({ size: [0.4, 40], align: -1 }), points: { show: false } },
        { label: "undesirable", stroke: COLORS.down, fill: COLORS.down + "cc", width: 1,
          paths: bars({ size: [0.4, 40], align: 1 }), points: { show: false } },
      ],
    };
  }

  function ingestionOpts() {
    return {
      scales: { x: { time: true } },
      axes: [{}, { label: "events / hour" }],
      series: [
        {},
        { label: "stored", stroke: COLORS.accent, fill: COLORS.accent + "33", width: 2,
          points: { show: false } },
      ],
    };
  }

  function renderActiveJobs(jobs) {
    var box = document.getElementById("active-jobs");
    if (!box) return;
    box.textContent = "";
    if (!jobs.length) {
      box.appendChild(el("p", { class: "muted", text: "No job is queued or running." }));
    }
    jobs.forEach(function (job) {
      var row = el("div", { class: "job-row", "data-job-id": String(job.id) }, [
        el("a", { href: "/dashboard/jobs/" + job.id, text: "job " + job.id }),
        badge(job.status),
        el("span", { class: "muted", text: "line " + job.line }),
      ].concat(progressNodes(job)));
      box.appendChild(row);
    });
    var queued = document.getElementById("jobs-queued");
    if (queued) {
      queued.textContent = String(jobs.filter(function (j) { return j.status === "queued"; }).length);
    }
  }

  function renderAllowed(balance) {
    var p = document.getElementById("training-allowed");
    if (!p) return;
    p.className = balance.allowed ? "ok" : "error";
    p.dataset.allowed = balance.allowed ? "true" : "false";
    p.textContent = balance.allowed ? "Training allowed" : "Training refused: " + balance.reason;
  }

  function initOverview(main) {
    var balanceEl = document.getElementById("balance-chart");
    var ingestEl = document.getElementById("ingestion-chart");
    var pollMs = Number(main.dataset.pollMs) || 15000;
    // The balance card keeps the line the page was opened for (empty: all feedback).
    var statusUrl = "/dashboard/api/status" +
      (main.dataset.line ? "?line=" + encodeURIComponent(main.dataset.line) : "");

    function refreshCharts() {
      var a = getJSON(balanceEl.dataset.url).then(function (d) {
        var c = d.counts;
        draw(balanceEl, function () { return balanceOpts(c.bucket_s); },
             [c.t, c.desirable, c.undesirable]);
        balanceEl.dataset.desirable = JSON.stringify(c.desirable);
        balanceEl.dataset.undesirable = JSON.stringify(c.undesirable);
      });
      var b = getJSON(ingestEl.dataset.url).then(function (d) {
        draw(ingestEl, ingestionOpts, [d.t, d.received]);
      });
      return Promise.all([a, b]);
    }

    function refreshStatus() {
      return getJSON(statusUrl).then(function (s) {
        fillFields(s);
        renderAllowed(s.balance);
        renderActiveJobs(s.active_jobs);
        setStatus("updated", "Updated " + new Date(s.generated_at).toLocaleTimeString());
      });
    }

    function tick() {
      Promise.all([refreshCharts(), refreshStatus()])
        .catch(function (err) { setStatus("updated", "Update failed: " + err.message); })
        .then(function () { window.setTimeout(tick, pollMs); });
    }
    refreshCharts().catch(function (err) { setStatus("updated", "Update failed: " + err.message); })
      .then(function () { window.setTimeout(tick, pollMs); });
  }

  // ---- job page ------------------------------------------------------------------------

  var SERIES_COLORS = {
    loss: COLORS.accent, kl: COLORS.c2, "rewards/chosen": COLORS.up,
    "rewards/rejected": COLORS.down, "rewards/margins": COLORS.c3,
    tokens_per_s: COLORS.accent, grad_norm: COLORS.c2, lr: COLORS.c3,
  };

  /* Small magnitudes (learning rates) need exponents, not "0". */
  function axisValues(u, vals) {
    return vals.map(function (v) {
      if (v === null || v === undefined) return "";
      var a = Math.abs(v);
      if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
      return String(+v.toPrecision(6));
    });
  }

  function stepOpts(names) {
    return function () {
      return {
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { values: axisValues, size: 60 }],
        series: [{ label: "step" }].concat(names.map(function (n) {
          return { label: n, stroke: SERIES_COLORS[n] || COLORS.accent, width: 2,
                   spanGaps: true, points: { show: false } };
        })),
      };
    };
  }

  function initJob(main) {
    var jobId = main.dataset.jobId;
    var pollMs = Number(main.dataset.pollMs) || 5000;
    var wasActive = main.dataset.active === "true";
    var steps = [];
    var series = {};
    var after = 0;
    var chartEls = Array.prototype.slice.call(document.querySelectorAll("#job-charts .chart"));

    function redraw() {
      chartEls.forEach(function (c) {
        var names = c.dataset.series.split(",");
        var data = [steps.slice()].concat(names.map(function (n) {
          return (series[n] || steps.map(function () { return null; })).slice();
        }));
        draw(c, stepOpts(names), data);
      });
    }

    function updateHead(job) {
      var status = document.getElementById("job-status");
      if (status) { status.textContent = ""; status.appendChild(badge(job.status)); }
      var prog = document.getElementById("job-progress");
      if (prog) {
        prog.textContent = "";
        progressNodes(job).forEach(function (n) { prog.appendChild(n); });
      }
    }

    function fetchMore() {
      return getJSON("/dashboard/api/jobs/" + jobId + "/metrics?after_step=" + after)
        .then(function (d) {
          d.step.forEach(function (s, i) {
            steps.push(s);
            Object.keys(d.series).forEach(function (n) {
              if (!series[n]) series[n] = new Array(steps.length - 1).fill(null);
              series[n].push(d.series[n][i]);
            });
            Object.keys(series).forEach(function (n) {
              if (series[n].length < steps.length) series[n].push(null);
            });
          });
          after = d.next_after_step;
          if (d.more) return fetchMore();
          return d;
        });
    }

    function tick() {
      fetchMore().then(function (d) {
        redraw();
        updateHead(d.job);
        setStatus("metrics-status", steps.length + " steps recorded" +
          (d.job.active ? " · live, every " + Math.round(pollMs / 1000) + " s" : ""));
        if (d.job.active) {
          window.setTimeout(tick, pollMs);
        } else if (wasActive) {
          location.reload();  // finished meanwhile: show its result or error
        }
      }).catch(function (err) {
        setStatus("metrics-status", "Update failed: " + err.message);
        window.setTimeout(tick, pollMs * 2);
      });
    }
    tick();
  }

  // ---- checkpoints -------------------------------------------------------------------------

  function initCheckpoints() {
    document.querySelectorAll(".ci").forEach(function (span) {
      var low = Number(span.dataset.low), high = Number(span.dataset.high);
      var band = el("span", { class: "band" });
      band.style.left = (100 * low) + "%";
      band.style.width = Math.max(1, 100 * (high - low)) + "%";
      span.appendChild(band);
      if (span.dataset.rate !== "") {
        var dot = el("span", { class: "dot" });
        dot.style.left = "calc(" + (100 * Number(span.dataset.rate)) + "% - 1px)";
        span.appendChild(dot);
      }
    });
  }

  function start() {
    var main = document.getElementById("main");
    var page = main && main.dataset.page;
    if (page === "overview") initOverview(main);
    else if (page === "job") initJob(main);
    else if (page === "checkpoints") initCheckpoints();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
