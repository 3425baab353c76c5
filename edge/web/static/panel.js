// LineInspect panel: small vanilla JS, no libraries. Pages are server-rendered;
// this file only refreshes the Live page, draws charts and the Teach histogram.
"use strict";
(function () {
  const page = document.body.dataset.page;
  const SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(x, d) { return (x === null || x === undefined) ? "—" : Number(x).toFixed(d); }

  const W = 300, H = 90, PAD = 12;

  function axes(svg, t0, t1, yMax, unit) {
    el("line", { x1: 0, x2: W, y1: H - PAD, y2: H - PAD, class: "axis" }, svg);
    const top = el("text", { x: 2, y: 9 }, svg);
    top.textContent = (yMax < 10 ? yMax.toFixed(1) : Math.round(yMax)) + (unit || "");
    const now = el("text", { x: W - 2, y: H - 1, "text-anchor": "end" }, svg);
    now.textContent = document.body.dataset.tNow || "now";
    const ago = el("text", { x: 2, y: H - 1 }, svg);
    ago.textContent = "-" + Math.round((t1 - t0) / 60) + " " + (document.body.dataset.tMin || "min");
  }

  // A line with a dot per point (a lone point stays visible); null values are gaps.
  function lineChart(svg, points, t0, t1, fixedMax, unit) {
    clear(svg);
    const vals = points.filter(p => p[1] !== null).map(p => p[1]);
    const yMax = fixedMax || Math.max(...vals, 1e-9) * 1.15;
    axes(svg, t0, t1, yMax, unit);
    const tx = t => (t - t0) / Math.max(1, t1 - t0) * W;
    const ty = v => H - PAD - Math.min(v, yMax) / yMax * (H - 2 * PAD);
    let d = "", pen = false;
    for (const [t, v] of points) {
      if (v === null) { pen = false; continue; }
      d += (pen ? "L" : "M") + tx(t).toFixed(1) + "," + ty(v).toFixed(1);
      pen = true;
      el("circle", { cx: tx(t).toFixed(1), cy: ty(v).toFixed(1), r: 1.6, class: "dot" }, svg);
    }
    if (d) el("path", { d: d, class: "line" }, svg);
  }

  // Stacked bars per bucket: OK, NG, ERROR parts per minute.
  function barChart(svg, buckets, bucketS, t0, t1) {
    clear(svg);
    const rate = 60 / bucketS;
    const yMax = Math.max(...buckets.map(b => (b.ok + b.ng + b.error) * rate), 1e-9) * 1.15;
    axes(svg, t0, t1, yMax, "");
    const bw = Math.max(1, bucketS / Math.max(1, t1 - t0) * W - 0.5);
    for (const b of buckets) {
      const x = (b.start_unix - t0) / Math.max(1, t1 - t0) * W;
      let y = H - PAD;
      for (const [n, cls] of [[b.ok, "bar-ok"], [b.ng, "bar-ng"], [b.error, "bar-err"]]) {
        if (!n) continue;
        const h = n * rate / yMax * (H - 2 * PAD);
        y -= h;
        el("rect", { x: x.toFixed(1), y: y.toFixed(1), width: bw.toFixed(1), height: h.toFixed(1), class: cls }, svg);
      }
    }
  }

  function drawStats(stats) {
    const t1 = Date.now() / 1000, t0 = stats.since_unix, b = stats.buckets;
    const yld = [], lat = [];
    for (const k of b) {
      const n = k.ok + k.ng + k.error, mid = k.start_unix + stats.bucket_s / 2;
      yld.push([mid, n ? 100 * k.ok / n : null]);
      lat.push([mid, k.latency_ms_p50]);
    }
    barChart(document.getElementById("chart-throughput"), b, stats.bucket_s, t0, t1);
    lineChart(document.getElementById("chart-yield"), yld, t0, t1, 100, "%");
    lineChart(document.getElementById("chart-latency"), lat, t0, t1, 0, "");
  }

  function setText(id, text) { const e = document.getElementById(id); if (e) e.textContent = text; }

  async function refreshStrip() {
    const r = await fetch("/api/parts?limit=12", { cache: "no-store" });
    if (!r.ok) return;
    const data = await r.json();
    const strip = document.getElementById("strip");
    clear(strip);
    for (const p of data.parts) {
      const a = document.createElement("a");
      a.href = "/parts/" + p.inspection_id;
      a.className = "v-" + p.code.toLowerCase();
      a.dataset.id = p.inspection_id;
      if (p.image_url || p.heatmap_url || p.code !== "OK") {
        const img = document.createElement("img");
        img.loading = "lazy";
        img.src = "/media/parts/" + p.inspection_id + "/thumb";
        // The store writes images in the background: retry once if this one is not there yet.
        img.onerror = () => { if (!img.dataset.retried) { img.dataset.retried = "1"; setTimeout(() => { img.src = img.src + "?r=1"; }, 1500); } };
        img.alt = p.code;
        a.appendChild(img);
      } else {
        const ph = document.createElement("div");
        ph.className = "ph";
        a.appendChild(ph);
      }
      const cap = document.createElement("span");
      cap.textContent = "#" + p.inspection_id + " " + p.code;
      a.appendChild(cap);
      strip.appendChild(a);
    }
  }

  function live() {
    const root = document.querySelector(".live");
    const every = Number(root.dataset.refreshMs) || 1000;
    const img = document.getElementById("live-image");
    let lastId = null, busy = false, statsAt = 0;
    async function tick() {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const r = await fetch("/api/live", { cache: "no-store" });
        if (r.status === 401) { location.href = "/login?next=/live"; return; }
        if (!r.ok) return;
        const d = await r.json();
        const s = d.stats;
        setText("count-ok", s.ok); setText("count-ng", s.ng); setText("count-error", s.error);
        setText("yield", s.yield_percent === null ? "—" : s.yield_percent.toFixed(1) + "%");
        setText("threshold", fmt(d.threshold, 3));
        if (Date.now() - statsAt > 3000) { drawStats(s); statsAt = Date.now(); }
        const p = d.part;
        if (p && p.inspection_id !== lastId) {
          lastId = p.inspection_id;
          const v = document.getElementById("verdict");
          v.textContent = p.code;
          v.className = "badge " + p.code.toLowerCase();
          setText("part-id", "#" + p.inspection_id);
          setText("score", fmt(p.score, 3));
          setText("defect", p.defect_class || p.error || "");
          document.getElementById("no-parts").hidden = true;
          const next = new Image();
          next.onload = () => { img.src = next.src; img.dataset.id = p.inspection_id; };
          next.src = d.live_image_url;
          refreshStrip();
        }
      } catch (e) { /* panel offline for a moment: try again next tick */ }
      finally { busy = false; }
    }
    tick();
    setInterval(tick, every);
  }

  function teach() {
    const jobs = document.getElementById("jobs");
    if (jobs && jobs.dataset.running === "1") setTimeout(() => location.reload(), 2000);
    const dataEl = document.getElementById("scores-data");
    if (!dataEl) return;
    const res = JSON.parse(dataEl.textContent);
    const good = res.good || [];
    const bad = [].concat(...Object.values(res.defective || {}));
    const svg = document.getElementById("score-hist");
    const slider = document.getElementById("threshold-slider");
    const all = good.concat(bad);
    const hi = Math.max(res.threshold * 2, ...all, 1e-6) * 1.05;
    slider.max = hi.toFixed(3);
    slider.step = (hi / 1000).toPrecision(2);
    const W = Math.max(300, Math.round(svg.clientWidth || 600)), H = 160, N = 40, AX = 14;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    function hist(xs) { const h = new Array(N).fill(0); for (const x of xs) h[Math.min(N - 1, Math.max(0, Math.floor(x / hi * N)))]++; return h; }
    const hg = hist(good), hb = hist(bad);
    const top = Math.max(...hg.map(c => c / Math.max(1, good.length)), ...hb.map(c => c / Math.max(1, bad.length)), 1e-9);
    function draw() {
      clear(svg);
      const bw = W / N;
      const base = H - AX;
      hg.forEach((c, i) => { const h = (c / Math.max(1, good.length)) / top * (base - 10); el("rect", { x: i * bw, y: base - h, width: bw - 1, height: h, class: "good" }, svg); });
      hb.forEach((c, i) => { const h = (c / Math.max(1, bad.length)) / top * (base - 10); el("rect", { x: i * bw, y: base - h, width: bw - 1, height: h, class: "bad" }, svg); });
      for (let k = 0; k <= 4; k++) {
        const v = hi * k / 4, lab = el("text", { x: Math.min(W - 2, Math.max(2, k / 4 * W)), y: H - 2, "text-anchor": k === 0 ? "start" : (k === 4 ? "end" : "middle") }, svg);
        lab.textContent = v.toFixed(2);
      }
      const t = Number(slider.value), x = t / hi * W;
      el("line", { x1: x, x2: x, y1: 0, y2: base, class: "thr" }, svg);
      // NG when score >= threshold (edge.decide): false rejects are good parts at or above it,
      // escapes are defective parts below it.
      const nFr = good.filter(s => s >= t).length, nEsc = bad.filter(s => s < t).length;
      setText("frr", good.length ? (100 * nFr / good.length).toFixed(1) + "% (" + nFr + "/" + good.length + ")" : "—");
      setText("escape", bad.length ? (100 * nEsc / bad.length).toFixed(1) + "% (" + nEsc + "/" + bad.length + ")" : "—");
      setText("slider-value", t.toFixed(3));
      const pt = document.getElementById("promote-threshold");
      if (pt) pt.value = t;
    }
    slider.addEventListener("input", draw);
    draw();
  }

  // Settings: show only the selected alternative of each tagged union (camera source type).
  function settings() {
    for (const sel of document.querySelectorAll("select[data-union]")) {
      const union = sel.dataset.union;
      const show = () => {
        for (const e of document.querySelectorAll('[data-variant-of="' + union + '"]')) {
          e.hidden = e.dataset.variant !== sel.value;
        }
      };
      sel.addEventListener("change", show);
      show();
    }
  }

  if (page === "live") live();
  else if (page === "settings") settings();
  else if (page === "teach") teach();
  else if (page === "health") setTimeout(() => location.reload(), 5000);
})();
