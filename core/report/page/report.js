// keel report page script: reads the inlined JSON (#report-data, built by core/report/report_page.cpp) and draws
// every chart with the inlined Apache ECharts. Each chart is drawn in its own try/catch so one failure does not
// hide the rest; failures, uncaught errors and console.error calls are listed at the top of the page and
// counted. When done it sets document.body.dataset.chartsDrawn (charts that hold drawn elements) and
// .reportErrors (errors caught), which the headless-browser test reads (tests/integration/test_report.cpp).
'use strict';

// The error hooks are installed by the template's first script (window.keelReportError), before the library.
var reportErrors = window.keelReportErrors;
var reportError = window.keelReportError;

var chartsDrawn = 0;
var charts = [];

// ---------- small helpers ----------
function el(tag, attrs, children) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) {
    if (k === 'text') node.textContent = attrs[k];
    else if (k === 'className') node.className = attrs[k];
    else node.setAttribute(k, attrs[k]);
  });
  (children || []).forEach(function (c) { node.appendChild(typeof c === 'string' ? document.createTextNode(c) : c); });
  return node;
}
function isNum(v) { return typeof v === 'number' && isFinite(v); }
function fmt(v, digits) {
  if (!isNum(v)) return '–';
  var a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return v.toFixed(digits === undefined ? 4 : digits);
}
// Axis labels: short, with an SI suffix for large numbers (tokens/s).
function axisFmt(v) {
  var a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toPrecision(3) + 'G';
  if (a >= 1e6) return (v / 1e6).toPrecision(3) + 'M';
  if (a >= 1e4) return (v / 1e3).toPrecision(3) + 'K';
  if (a !== 0 && a < 1e-2) return v.toExponential(1);
  return String(Math.round(v * 1000) / 1000);
}
function note(text) { return el('p', { className: 'note', text: text }); }

// Draws one chart into `container`; counts it when ECharts has drawn elements into it.
function drawChart(container, option, name) {
  try {
    var chart = echarts.init(container, null, { renderer: 'canvas' });
    option.animation = false;
    chart.setOption(option);
    charts.push(chart);
    var zr = chart.getZr();
    var drawn = zr && zr.storage && typeof zr.storage.getDisplayList === 'function'
      ? zr.storage.getDisplayList(true).length > 0 : true;
    if (drawn) chartsDrawn += 1;
    else reportError(name, new Error('the chart drew nothing'));
    return chart;
  } catch (err) {
    reportError(name, err);
    return null;
  }
}

// ---------- data ----------
var data = JSON.parse(document.getElementById('report-data').textContent);
var runs = data.runs;
var palette = ['#3b6fd1', '#e0702a', '#2e9e5b', '#c23b5b', '#8a56c2', '#7a6a2a', '#1ba3a3', '#d14fb0', '#5b6474'];
function runColor(i) { return palette[i % palette.length]; }

// Per run: step -> index into its kept rows.
runs.forEach(function (run) {
  run.indexOfStep = {};
  run.steps.forEach(function (s, i) { run.indexOfStep[s] = i; });
});

var EVENT_STYLE = {
  skip: { symbol: 'triangle', color: '#d62728' },
  rollback: { symbol: 'diamond', color: '#9b1c9b' },
  rollback_unavailable: { symbol: 'diamond', color: '#c77dc7' },
  plugin_swap: { symbol: 'rect', color: '#1f8a70' },
  plugin_swap_refused: { symbol: 'rect', color: '#8aa' },
  checkpoint: { symbol: 'pin', color: '#6b7a99' },
  lr_factor: { symbol: 'arrow', color: '#e6a100' },
  stop: { symbol: 'roundRect', color: '#333' },
  resume: { symbol: 'circle', color: '#2b7bb9' }
};
var HIDDEN_EVENT_KINDS = { checkpoint_pruned: true, run_start: true, run_end: true, lineage: true };
function eventStyle(kind) { return EVENT_STYLE[kind] || { symbol: 'circle', color: '#555' }; }

// Events on the curves: those with a step >= 0, except bookkeeping kinds (listed in the events table).
function curveEvents() {
  var out = [];
  runs.forEach(function (run, r) {
    run.events.forEach(function (e) {
      if (e.step >= 0 && !HIDDEN_EVENT_KINDS[e.kind]) out.push({ run: r, step: e.step, kind: e.kind, text: e.text });
    });
  });
  return out;
}

// The value of `key` of a run at `step`, or at the nearest earlier step it has.
function valueAt(run, key, step) {
  var i = run.indexOfStep[step];
  if (i === undefined) {
    for (i = run.steps.length - 1; i >= 0 && run.steps[i] > step; i--) { /* nearest earlier */ }
    if (i < 0) return null;
  }
  var v = run[key][i];
  return isNum(v) ? v : null;
}

// ---------- header, run table ----------
function drawHeader() {
  document.getElementById('meta').textContent = runs.length + ' run(s) · generated ' + data.generated_utc +
    ' by keel ' + data.keel_version;
  var rows = runs.map(function (run) {
    var skipped = run.skipped_steps.length;
    return el('tr', {}, [
      el('td', { text: run.name }), el('td', { text: run.arm }), el('td', { text: run.seed >= 0 ? String(run.seed) : '–' }),
      el('td', { className: 'num', text: String(run.steps.length) }),
      el('td', { className: 'num', text: run.steps.length ? run.steps[0] + '–' + run.steps[run.steps.length - 1] : '–' }),
      el('td', { className: 'num', text: fmt(run.final_train_loss) }),
      el('td', { className: 'num', text: String(skipped) }),
      el('td', { className: 'num', text: String(run.superseded.step.length) }),
      el('td', { className: 'num', text: String(run.events.length) }),
      el('td', { text: run.evals.map(function (e) { return 'step ' + e.step; }).join(', ') || '–' }),
      el('td', { text: run.dir })
    ]);
  });
  var head = el('tr', {}, ['run', 'arm', 'seed', 'steps', 'step range', 'final train loss', 'skipped',
    'rolled-back rows', 'events', 'eval files', 'dir'].map(function (h) { return el('th', { text: h }); }));
  document.getElementById('run-table').appendChild(el('table', {}, [head].concat(rows)));
}

// ---------- curves ----------
var CURVES = [
  { key: 'loss', title: 'Training loss', axis: 'value' },
  { key: 'grad_norm', title: 'Gradient norm (before clipping)', axis: 'log' },
  { key: 'lr', title: 'Learning rate', axis: 'value' },
  { key: 'tokens_per_s', title: 'Throughput (tokens/s)', axis: 'value' }
];

function drawCurve(spec) {
  var events = curveEvents();
  var positive = spec.axis === 'log';
  function y(v) { return isNum(v) && (!positive || v > 0) ? v : null; }
  var series = [];
  runs.forEach(function (run, r) {
    series.push({
      name: run.name, type: 'line', showSymbol: false, sampling: 'lttb', connectNulls: false,
      lineStyle: { width: 1.5 }, itemStyle: { color: runColor(r) }, emphasis: { disabled: true },
      data: run.steps.map(function (s, i) { return [s, y(run[spec.key][i])]; })
    });
    if (run.superseded.step.length) {
      series.push({
        name: run.name + ' (rolled back)', type: 'scatter', symbol: 'emptyCircle', symbolSize: 7,
        itemStyle: { color: runColor(r) },
        data: run.superseded.step.map(function (s, i) { return [s, y(run.superseded[spec.key][i])]; })
      });
    }
  });
  var kinds = [];
  events.forEach(function (e) { if (kinds.indexOf(e.kind) < 0) kinds.push(e.kind); });
  kinds.forEach(function (kind) {
    var style = eventStyle(kind);
    series.push({
      name: 'event: ' + kind, type: 'scatter', symbol: style.symbol, symbolSize: 11, z: 5,
      itemStyle: { color: style.color, borderColor: '#fff', borderWidth: 1 },
      data: events.filter(function (e) { return e.kind === kind; }).map(function (e) {
        return { value: [e.step, y(valueAt(runs[e.run], spec.key, e.step))], event: e };
      }).filter(function (p) { return p.value[1] !== null; })
    });
  });
  var option = {
    title: { text: spec.title, left: 'center', textStyle: { fontSize: 14 } },
    legend: { type: 'scroll', top: 24 },
    grid: { left: 70, right: 30, top: 60, bottom: 70 },
    tooltip: {
      trigger: 'axis', axisPointer: { type: 'line' }, confine: true,
      formatter: function (params) { return curveTooltip(spec, params, events); }
    },
    xAxis: { type: 'value', name: 'step', nameLocation: 'middle', nameGap: 25, min: 'dataMin', max: 'dataMax' },
    yAxis: { type: spec.axis, scale: true, axisLabel: { formatter: axisFmt } },
    dataZoom: [{ type: 'inside' }, { type: 'slider', height: 18, bottom: 8 }],
    series: series
  };
  drawChart(document.getElementById('chart-' + spec.key), option, spec.title);
}

// Eval loss against step: one line per run and source, from eval/step-N.h5 files and `keel eval --all`'s
// eval/curve.h5 (the run table lists them). Without any, a note instead of an empty chart.
function drawEvalCurve() {
  var div = document.getElementById('chart-eval');
  var series = [];
  runs.forEach(function (run, r) {
    var bySource = {};
    var names = [];
    run.evals.forEach(function (e) {
      e.sources.forEach(function (s) {
        if (!bySource[s.source]) { bySource[s.source] = []; names.push(s.source); }
        bySource[s.source].push({ value: [e.step, isNum(s.nll) ? s.nll : null], seen: s.seen_in_training });
      });
    });
    names.forEach(function (name, k) {
      series.push({
        name: run.name + ' · ' + name, type: 'line', showSymbol: true, symbolSize: 6, connectNulls: false,
        itemStyle: { color: runColor(r) }, lineStyle: { width: 1.5, type: k % 2 ? 'dashed' : 'solid' },
        data: bySource[name]
      });
    });
  });
  if (!series.length) {
    div.parentNode.replaceChild(note('No eval results: `keel eval --all RUN_DIR` writes the eval curve.'), div);
    return;
  }
  drawChart(div, {
    title: { text: 'Eval loss (mean token NLL per source)', left: 'center', textStyle: { fontSize: 14 } },
    legend: { type: 'scroll', top: 24 },
    grid: { left: 70, right: 30, top: 60, bottom: 70 },
    tooltip: {
      trigger: 'item', confine: true,
      formatter: function (p) {
        return escapeHtml(p.seriesName) + '<br>step ' + p.value[0] + ': nll ' + fmt(p.value[1]) +
          '<br>seen_in_training ' + p.data.seen;
      }
    },
    xAxis: { type: 'value', name: 'step', nameLocation: 'middle', nameGap: 25, min: 'dataMin', max: 'dataMax' },
    yAxis: { type: 'value', scale: true, axisLabel: { formatter: axisFmt } },
    dataZoom: [{ type: 'inside' }, { type: 'slider', height: 18, bottom: 8 }],
    series: series
  }, 'Eval loss');
}

// Training loss per source (/train/source_loss): one line per run and source, a source's line dashed by its index.
// Without per-source losses (runs from before they were logged), a note instead of an empty chart.
function drawSourceLoss() {
  var div = document.getElementById('chart-source_loss');
  var series = [];
  runs.forEach(function (run, r) {
    if (!run.source_loss) return;
    run.source_loss.sources.forEach(function (name, k) {
      var values = run.source_loss.loss[k];
      series.push({
        name: run.name + ' · ' + name, type: 'line', showSymbol: false, sampling: 'lttb', connectNulls: true,
        itemStyle: { color: runColor(r) }, lineStyle: { width: 1.2, type: ['solid', 'dashed', 'dotted'][k % 3] },
        emphasis: { disabled: true },
        data: run.steps.map(function (s, i) { return [s, isNum(values[i]) ? values[i] : null]; })
      });
    });
  });
  if (!series.length) {
    div.parentNode.replaceChild(note('No per-source losses in these runs (logged since /train/source_loss).'), div);
    return;
  }
  drawChart(div, {
    title: { text: 'Training loss per source', left: 'center', textStyle: { fontSize: 14 } },
    legend: { type: 'scroll', top: 24 },
    grid: { left: 70, right: 30, top: 60, bottom: 70 },
    tooltip: { trigger: 'axis', confine: true },
    xAxis: { type: 'value', name: 'step', nameLocation: 'middle', nameGap: 25, min: 'dataMin', max: 'dataMax' },
    yAxis: { type: 'value', scale: true, axisLabel: { formatter: axisFmt } },
    dataZoom: [{ type: 'inside' }, { type: 'slider', height: 18, bottom: 8 }],
    series: series
  }, 'Training loss per source');
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, function (c) {
    return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c];
  });
}

function curveTooltip(spec, params, events) {
  if (!params.length) return '';
  var step = Math.round(params[0].axisValue);
  var lines = ['<b>step ' + step + '</b>'];
  runs.forEach(function (run, r) {
    var i = run.indexOfStep[step];
    if (i === undefined) return;
    var extra = run.skipped_steps.indexOf(step) >= 0 ? ' (update skipped)' : '';
    lines.push('<span style="color:' + runColor(r) + '">●</span> ' + escapeHtml(run.name) + ': ' +
      fmt(run[spec.key][i]) + extra);
  });
  events.filter(function (e) { return e.step === step; }).forEach(function (e) {
    lines.push('<span style="color:' + eventStyle(e.kind).color + '">◆</span> ' + escapeHtml(runs[e.run].name) +
      ' <b>' + escapeHtml(e.kind) + '</b>: ' + escapeHtml(e.text));
  });
  return lines.join('<br>');
}

// ---------- per-tensor heatmaps ----------
function drawHeatmaps() {
  var list = document.getElementById('heatmap-list');
  runs.forEach(function (run) {
    list.appendChild(el('h3', { text: run.name }));
    var h = run.heatmap;
    if (!h) { list.appendChild(note('no per-tensor gradient norms in this run (metrics.per_tensor = false)')); return; }
    var cells = [], lo = Infinity, hi = -Infinity;
    h.log10.forEach(function (row, t) {
      row.forEach(function (v, c) {
        if (!isNum(v)) return;
        cells.push([c, t, v]);
        lo = Math.min(lo, v); hi = Math.max(hi, v);
      });
    });
    if (!cells.length) { list.appendChild(note('per-tensor gradient norms were never measured in this run')); return; }
    var labels = h.first_step.map(function (s, c) { return s === h.last_step[c] ? String(s) : s + '–' + h.last_step[c]; });
    var div = el('div', { className: 'chart' });
    div.style.height = Math.max(260, 16 * h.tensors.length + 120) + 'px';
    list.appendChild(div);
    drawChart(div, {
      tooltip: {
        confine: true,
        formatter: function (p) {
          return escapeHtml(h.tensors[p.value[1]]) + '<br>step ' + labels[p.value[0]] + '<br>grad norm ' +
            fmt(Math.pow(10, p.value[2])) + (h.first_step[p.value[0]] !== h.last_step[p.value[0]] ? ' (largest in range)' : '');
        }
      },
      grid: { left: 220, right: 90, top: 10, bottom: 60 },
      xAxis: { type: 'category', data: labels, name: 'step', nameLocation: 'middle', nameGap: 40 },
      yAxis: { type: 'category', data: h.tensors, axisLabel: { fontSize: 10 } },
      visualMap: {
        type: 'continuous', min: lo, max: hi === lo ? lo + 1 : hi, calculable: true, orient: 'vertical', right: 10,
        top: 'middle', text: ['log10', ''], inRange: { color: ['#1a2a6c', '#2f8fbf', '#b8e186', '#fdae61', '#d7191c'] }
      },
      dataZoom: [{ type: 'inside', xAxisIndex: 0 }],
      series: [{ type: 'heatmap', data: cells, progressive: 0 }]
    }, 'heatmap ' + run.name);
  });
}

// ---------- instability precursors: layer x step heatmaps on a shared scale ----------
var PRECURSORS = [
  { key: 'attn_logit_max', title: 'max attention logit (max over heads)' },
  { key: 'block_rms', title: 'block output RMS' }
];

function drawPrecursors() {
  var list = document.getElementById('precursor-list');
  var any = runs.some(function (run) { return run.precursors; });
  if (!any) { list.appendChild(note('No run in this report logged precursors (set metrics.stats_every = N).')); return; }
  runs.forEach(function (run) {
    var p = run.precursors;
    list.appendChild(el('h3', { text: run.name }));
    if (!p) { list.appendChild(note('no /stats/ in this run (metrics.stats_every = 0)')); return; }
    PRECURSORS.forEach(function (spec) {
      var scale = data.precursor_scale[spec.key];
      var grid = p[spec.key], cells = [];
      grid.forEach(function (row, layer) {
        row.forEach(function (v, c) { if (isNum(v)) cells.push([c, layer, v]); });
      });
      var layers = grid.map(function (row, l) { return 'layer ' + l; });
      var div = el('div', { className: 'chart' });
      div.dataset.precursor = spec.key;
      div.style.height = Math.max(200, 22 * layers.length + 110) + 'px';
      list.appendChild(div);
      drawChart(div, {
        title: { text: spec.title, left: 'center', textStyle: { fontSize: 13 } },
        tooltip: {
          confine: true,
          formatter: function (q) { return layers[q.value[1]] + '<br>step ' + p.steps[q.value[0]] + '<br>' + fmt(q.value[2]); }
        },
        grid: { left: 80, right: 90, top: 30, bottom: 50 },
        xAxis: { type: 'category', data: p.steps.map(String), name: 'step', nameLocation: 'middle', nameGap: 30 },
        yAxis: { type: 'category', data: layers },
        visualMap: {
          type: 'continuous', min: scale ? scale[0] : 0, max: scale && scale[1] > scale[0] ? scale[1] : (scale ? scale[0] + 1 : 1),
          calculable: true, orient: 'vertical', right: 10, top: 'middle',
          inRange: { color: ['#1a2a6c', '#2f8fbf', '#b8e186', '#fdae61', '#d7191c'] }
        },
        series: [{ type: 'heatmap', data: cells, progressive: 0 }]
      }, spec.key + ' ' + run.name);
    });
  });
}

// ---------- spike table ----------
function drawSpikeTable() {
  var rows = [];
  runs.forEach(function (run) {
    (run.spikes || []).forEach(function (s) {
      rows.push(el('tr', {}, [el('td', { text: run.name }), el('td', { className: 'num', text: String(s.step) }),
        el('td', { text: s.detector }), el('td', { className: 'num', text: fmt(s.z, 2) }), el('td', { text: s.action }),
        el('td', { text: s.top_sources.map(function (t) { return t.source + ' (+' + fmt(t.rise, 3) + ')'; }).join(', ') || '–' }),
        el('td', { text: s.text })]));
    });
  });
  var box = document.getElementById('spike-table');
  if (!rows.length) { box.appendChild(note('No step decisions (skip, rollback, stop, LR factor) in these runs.')); return; }
  var head = el('tr', {}, ['run', 'step', 'detector', 'z-score', 'action', 'top sources (loss rise)', 'reason']
    .map(function (h) { return el('th', { text: h }); }));
  box.appendChild(el('table', { id: 'spike-rows' }, [head].concat(rows)));
}

// ---------- lineage tree ----------
function lineageTree() {
  var nodes = {}, roots = [];
  runs.forEach(function (run) {
    var l = run.lineage;
    var id = l ? l.run_id : 'dir:' + run.dir;
    nodes[id] = {
      name: run.name, run: run, children: [],
      tip: '<b>' + escapeHtml(run.name) + '</b>' + (l ? ' [' + escapeHtml(l.run_id) + ']<br>' + escapeHtml(l.kind) +
        (l.parent ? ' from ' + escapeHtml(l.parent.checkpoint) + ' (step ' + l.parent.step + ')' : '') : '<br>no lineage.json') +
        (l ? l.changes.map(function (c) { return '<br>' + escapeHtml(c.key) + ': ' + escapeHtml(c.from) + ' → ' + escapeHtml(c.to); }).join('') +
          l.notes.map(function (n) { return '<br>' + escapeHtml(n); }).join('') : '')
    };
  });
  runs.forEach(function (run) {
    var l = run.lineage;
    var node = nodes[l ? l.run_id : 'dir:' + run.dir];
    if (l && l.parent) {
      var label = l.kind + ' @ step ' + l.parent.step;
      node.name = run.name + ' · ' + label;
      if (!nodes[l.parent.run_id]) {  // the parent is not in the report: show it, greyed
        nodes[l.parent.run_id] = { name: l.parent.run_dir + ' (not in this report)', children: [],
          tip: escapeHtml(l.parent.run_dir) + ' [' + escapeHtml(l.parent.run_id) + '], not in this report',
          itemStyle: { color: '#bbb' } };
        roots.push(nodes[l.parent.run_id]);
      }
      nodes[l.parent.run_id].children.push(node);
    } else {
      node.name = run.name + ' · ' + (l ? 'root' : 'no lineage');
      roots.push(node);
    }
  });
  return roots.length === 1 ? roots[0] : { name: 'runs', children: roots, tip: roots.length + ' trees' };
}

function drawLineage() {
  var root = lineageTree();
  var depth = 0, leaves = 0;
  (function walk(n, d) { depth = Math.max(depth, d); if (!n.children.length) leaves++; n.children.forEach(function (c) { walk(c, d + 1); }); })(root, 0);
  var div = document.getElementById('chart-lineage');
  div.style.height = Math.max(220, 70 * leaves) + 'px';
  drawChart(div, {
    tooltip: { trigger: 'item', confine: true, formatter: function (p) { return p.data.tip || escapeHtml(p.name); } },
    series: [{
      type: 'tree', data: [root], orient: 'LR', top: 20, bottom: 20, left: 140, right: 220,
      symbolSize: 10, initialTreeDepth: -1, expandAndCollapse: false,
      label: { position: 'left', verticalAlign: 'middle', align: 'right', fontSize: 12 },
      leaves: { label: { position: 'right', verticalAlign: 'middle', align: 'left' } },
      lineStyle: { width: 1.5 }
    }]
  }, 'lineage');
}

// ---------- A/B ----------
function drawAb() {
  var ab = data.ab;
  var notes = document.getElementById('ab-notes');
  ab.notes.forEach(function (n) { notes.appendChild(note(n)); });
  if (ab.arms.length) {
    notes.appendChild(el('p', { className: 'hint', text: 'Arms: ' + ab.arms.join(', ') + ' · baseline: ' + ab.baseline +
      '. Values are mean ± sd over seeds (n runs). Δ is arm − baseline: paired by seed index where both arms have ' +
      'the same -seed<N> (mean ± sd of the paired differences, 95% CI from Student\'s t), otherwise the difference ' +
      'of the means with Welch\'s 95% CI. Lower loss is better.' }));
  }
  drawAbChart(ab);
  drawAbTable(ab);
}

function errorHalfWidth(d) {
  if (isNum(d.ci_low) && isNum(d.ci_high)) return { lo: d.ci_low, hi: d.ci_high, what: '95% CI' };
  if (isNum(d.sd)) return { lo: d.mean - d.sd, hi: d.mean + d.sd, what: '± sd' };
  return null;
}

// The source filter above the A/B chart: "all sources" or one of them; redraws the chart on a change.
function drawAbChart(ab) {
  var all = ab.rows.filter(function (r) { return r.metric.kind === 'eval_loss' && r.difference; });
  var sources = [];
  all.forEach(function (r) { if (sources.indexOf(r.metric.source) < 0) sources.push(r.metric.source); });
  var select = document.getElementById('ab-source-filter');
  if (sources.length > 1) {
    [''].concat(sources).forEach(function (s) { select.appendChild(el('option', { value: s, text: s || 'all sources' })); });
    document.getElementById('ab-filter-box').hidden = false;
  }
  var chart = drawAbChartRows(ab, all);
  select.addEventListener('change', function () {
    var picked = select.value;
    var rows = all.filter(function (r) { return !picked || r.metric.source === picked; });
    if (chart) chart.setOption(abChartOption(ab, rows), true);
  });
}

function drawAbChartRows(ab, rows) {
  var div = document.getElementById('chart-ab');
  if (!rows.length) {
    div.hidden = true;
    div.parentNode.insertBefore(note('No A/B chart: it needs eval files (keel eval) in at least two arms at the ' +
      'same checkpoint step.'), div);
    return;
  }
  return drawChart(div, abChartOption(ab, rows), 'A/B chart');
}

// The bars and error bars of the A/B chart: one pair of series per arm, one category per source @ eval step.
function abSeries(ab, rows, categories, arms) {
  var series = [];
  arms.forEach(function (arm, a) {
    var color = palette[(a + 1) % palette.length];
    var byCat = {};
    rows.filter(function (r) { return r.arm === arm; }).forEach(function (r) { byCat[r.metric.source + ' @ ' + r.metric.eval_step] = r; });
    series.push({
      name: arm + ' − ' + ab.baseline, type: 'bar', itemStyle: { color: color },
      data: categories.map(function (c) { var r = byCat[c]; return r ? { value: r.difference.mean, row: r } : null; })
    });
    series.push({
      name: arm + ' − ' + ab.baseline, type: 'custom', itemStyle: { color: '#222' }, z: 10,
      encode: { x: 0, y: [1, 2] },
      data: categories.map(function (c, i) {
        var r = byCat[c]; var e = r && errorHalfWidth(r.difference);
        return e ? [i, e.lo, e.hi, a] : [i, null, null, a];
      }),
      renderItem: function (params, api) {
        if (api.value(1) === null || !isNum(api.value(1))) return null;
        var barCount = arms.length, bandWidth = api.size([1, 0])[0];
        var offset = (api.value(3) - (barCount - 1) / 2) * bandWidth * 0.8 / barCount;
        var lo = api.coord([api.value(0), api.value(1)]), hi = api.coord([api.value(0), api.value(2)]);
        var x = lo[0] + offset, w = Math.max(4, bandWidth * 0.1);
        var style = { stroke: '#222', lineWidth: 1.5 };
        return { type: 'group', children: [
          { type: 'line', shape: { x1: x, y1: lo[1], x2: x, y2: hi[1] }, style: style },
          { type: 'line', shape: { x1: x - w, y1: lo[1], x2: x + w, y2: lo[1] }, style: style },
          { type: 'line', shape: { x1: x - w, y1: hi[1], x2: x + w, y2: hi[1] }, style: style }
        ] };
      }
    });
  });
  return series;
}

// The A/B chart's option for `rows` (eval-loss rows with a difference).
function abChartOption(ab, rows) {
  var categories = [], arms = [];
  rows.forEach(function (r) {
    var c = r.metric.source + ' @ ' + r.metric.eval_step;
    if (categories.indexOf(c) < 0) categories.push(c);
    if (arms.indexOf(r.arm) < 0) arms.push(r.arm);
  });
  var series = abSeries(ab, rows, categories, arms);
  return {
    animation: false,
    title: { text: 'Eval loss difference to ' + ab.baseline + ' (error bars: 95% CI, else ± sd)', left: 'center',
      textStyle: { fontSize: 14 } },
    legend: { top: 24 },
    grid: { left: 70, right: 30, top: 60, bottom: 40 },
    tooltip: {
      trigger: 'item', confine: true,
      formatter: function (p) {
        var r = p.data && p.data.row; if (!r) return '';
        var d = r.difference;
        return '<b>' + escapeHtml(r.arm) + ' − ' + escapeHtml(ab.baseline) + '</b><br>' + escapeHtml(r.metric.label) +
          '<br>Δ ' + fmt(d.mean) + (isNum(d.sd) ? ' ± ' + fmt(d.sd) : '') + ' (' + (d.paired ? 'paired' : 'unpaired') +
          ', n = ' + d.n + ')<br>95% CI ' + fmt(d.ci_low) + ' … ' + fmt(d.ci_high);
      }
    },
    xAxis: { type: 'category', data: categories },
    yAxis: { type: 'value', name: 'Δ loss', axisLabel: { formatter: axisFmt } },
    series: series
  };
}

function drawAbTable(ab) {
  if (!ab.rows.length) { document.getElementById('ab-table').appendChild(note('No metrics to compare.')); return; }
  var head = el('tr', {}, ['metric', 'arm', 'n', 'mean ± sd', 'Δ vs ' + ab.baseline + ' (mean ± sd)', '95% CI of Δ',
    'pairing', 'values (run: value)'].map(function (h) { return el('th', { text: h }); }));
  var rows = ab.rows.map(function (r) {
    var d = r.difference;
    var deltaClass = 'num';
    if (d && isNum(d.ci_low) && isNum(d.ci_high) && (d.ci_high < 0 || d.ci_low > 0)) deltaClass += d.mean < 0 ? ' better' : ' worse';
    var tr = el('tr', { className: r.arm === ab.baseline ? 'baseline' : '' }, [
      el('td', { text: r.metric.label }),
      el('td', { text: r.arm + (r.arm === ab.baseline ? ' (baseline)' : '') }),
      el('td', { className: 'num', text: String(r.n) }),
      el('td', { className: 'num', text: fmt(r.mean) + (isNum(r.sd) ? ' ± ' + fmt(r.sd) : '') }),
      el('td', { className: deltaClass, text: d ? fmt(d.mean) + (isNum(d.sd) ? ' ± ' + fmt(d.sd) : '') : '–' }),
      el('td', { className: 'num', text: d && isNum(d.ci_low) ? '[' + fmt(d.ci_low) + ', ' + fmt(d.ci_high) + ']' : '–' }),
      el('td', { text: d ? (d.paired ? 'paired, ' + d.n + ' seed(s)' : 'unpaired') : '' }),
      el('td', { text: r.runs.map(function (name, i) { return name + ': ' + fmt(r.values[i]); }).join(', ') })
    ]);
    return tr;
  });
  document.getElementById('ab-table').appendChild(el('table', {}, [head].concat(rows)));
}

// ---------- events table ----------
function drawEventTable() {
  var rows = [];
  runs.forEach(function (run) {
    run.events.forEach(function (e) {
      rows.push(el('tr', {}, [el('td', { text: run.name }), el('td', { className: 'num', text: String(e.step) }),
        el('td', { text: e.kind }), el('td', { text: e.text })]));
    });
  });
  var box = document.getElementById('event-table');
  if (!rows.length) { box.appendChild(note('No events.')); return; }
  var head = el('tr', {}, ['run', 'step', 'kind', 'text'].map(function (h) { return el('th', { text: h }); }));
  box.appendChild(el('table', {}, [head].concat(rows)));
}

// ---------- main ----------
[drawHeader, function () { CURVES.forEach(drawCurve); }, drawSourceLoss, drawEvalCurve, drawHeatmaps, drawPrecursors,
  drawSpikeTable, drawLineage, drawAb, drawEventTable]
  .forEach(function (step) { try { step(); } catch (err) { reportError(step.name || 'page', err); } });
window.addEventListener('resize', function () { charts.forEach(function (c) { c.resize(); }); });
document.body.dataset.chartsDrawn = String(chartsDrawn);
document.body.dataset.reportErrors = String(reportErrors.length);
