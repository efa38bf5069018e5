/* JIP Federated charts: draws every <div data-chart="i"> from the JSON in #jipfed-charts with uPlot
 * (vendored in static/uplot, no CDN). Each chart: {title, xlabel, x: [...], lines: [{label, values,
 * width, dash}]}. Titles live in the HTML heading, not on the canvas, so they are never cut off. */
(function () {
  "use strict";
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];

  function draw(el, chart) {
    var series = [{ label: chart.xlabel }];
    var data = [chart.x];
    chart.lines.forEach(function (line, i) {
      series.push({
        label: line.label,
        stroke: line.color || COLORS[i % COLORS.length],
        width: line.width || 1.5,
        dash: line.dash || undefined,
        spanGaps: true,
        points: { show: true, size: line.width > 2 ? 7 : 5 },
        value: function (u, v) { return v == null ? "-" : v.toFixed(4); }
      });
      data.push(line.values);
    });
    var width = Math.max(320, Math.min(el.clientWidth || 800, 1100));
    var opts = {
      width: width,
      height: 320,
      scales: { x: { time: false } },
      axes: [
        chart.integer_x ? { label: chart.xlabel, incrs: [1, 2, 5, 10, 20, 50, 100], space: 40 } : { label: chart.xlabel },
        { label: chart.ylabel || "", size: 60 }
      ],
      series: series,
      legend: { live: true }
    };
    el.innerHTML = "";
    new uPlot(opts, data, el);
    el.setAttribute("data-drawn", "1");
  }

  function drawAll() {
    var source = document.getElementById("jipfed-charts");
    if (!source || typeof uPlot === "undefined") { return; }
    var charts = JSON.parse(source.textContent);
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      draw(el, charts[Number(el.getAttribute("data-chart"))]);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", drawAll);
  } else {
    drawAll();
  }
})();
