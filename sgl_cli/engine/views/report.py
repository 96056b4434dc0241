"""`sgl report`: one self-contained HTML page of a whole run (no network: styles, script, charts and thumbnails
inline), which any browser opens.

- a summary: items, errors, exit rate, visual and retained tokens, time per item per stage, and, where the records
  carry references, accuracy overall, per question type and per exit decision;
- charts (inline SVG): the exit-score histogram with the threshold, retained tokens, time per item;
- a gallery, one card per record (`data-item-id`): the thumbnail with the dropped tokens shaded (from the saved
  rankings), the question, both answers, the exit decision and score, the reference and whether it matched, the
  error; filters (all, exited, large, wrong, errors), a search by id or text, and pages of 60 cards, so that tens
  of thousands of records stay responsive (the page builds only the cards it shows). The filter, search and page
  live in the URL's fragment (`#filter=wrong&q=cat&page=2`), so a view can be linked and reopened.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

from .report_data import ReportData

PAGE = 60


def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def histogram(values: list[float], title: str, unit: str = "", marker: float | None = None, bins: int = 24,
              width: int = 340, height: int = 150) -> str:
    """An inline SVG histogram (and a vertical line at `marker`)."""
    esc = html.escape
    if not values:
        return f'<figure class="chart"><figcaption>{esc(title)}</figcaption><p class="muted">no data</p></figure>'
    lo, hi = min(values), max(values)
    if marker is not None:
        lo, hi = min(lo, marker), max(hi, marker)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / span * bins))] += 1
    top = max(counts)
    pad, plot_h = 24, height - 40
    bar_w = (width - 2 * pad) / bins
    bars = "".join(
        f'<rect x="{pad + i * bar_w:.1f}" y="{10 + plot_h * (1 - c / top):.1f}" width="{max(bar_w - 1, 1):.1f}" '
        f'height="{plot_h * c / top:.1f}" class="bar"><title>{c}</title></rect>' for i, c in enumerate(counts) if c)
    line = ""
    if marker is not None:
        x = pad + (marker - lo) / span * (width - 2 * pad)
        line = (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="6" y2="{10 + plot_h}" class="marker"/>'
                f'<text x="{x + 3:.1f}" y="16" class="label">{marker:.3g}</text>')
    axis = (f'<text x="{pad}" y="{height - 8}" class="label">{lo:.3g}{esc(unit)}</text>'
            f'<text x="{width - pad}" y="{height - 8}" class="label" text-anchor="end">{hi:.3g}{esc(unit)}</text>')
    return (f'<figure class="chart"><figcaption>{esc(title)} <span class="muted">({len(values)})</span>'
            f'</figcaption><svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
            f'{bars}{line}{axis}</svg></figure>')


def summary_html(data: ReportData) -> str:
    s = data.summary
    rows = [("items", f"{s['items']:,}"), ("errors", f"{s['errors']:,}"),
            ("exit rate", _fmt(s["exit_rate"], ".1%")),
            ("visual tokens (mean)", _fmt(s["visual_tokens"], ".1f")),
            ("retained tokens (mean, large calls)", _fmt(s["retained_tokens"], ".1f")),
            ("token ratio (retained / visual)", _fmt(s["token_ratio"], ".3f")),
            ("threshold", _fmt(s["threshold"], ".4g"))]
    if s["accuracy"] is not None:
        acc, n = s["accuracy"]
        rows.append((f"accuracy ({data.metric}, {n} with a reference)", f"{acc:.3f}"))
        for decision, value in s["accuracy_by_exit"].items():
            if value is not None:
                rows.append((f"accuracy, {'exited to small' if decision == 'small' else 'large model'}",
                             f"{value[0]:.3f} ({value[1]})"))
        for kind, value in s["accuracy_by_type"].items():
            if value is not None:
                rows.append((f"accuracy, type {kind}", f"{value[0]:.3f} ({value[1]})"))
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    times = "".join(
        f"<tr><th>{stage}</th><td>{_fmt(q['median'], '.1f')}</td><td>{_fmt(q['p90'], '.1f')}</td>"
        f"<td>{_fmt(q['p99'], '.1f')}</td></tr>" for stage, q in s["ms"].items())
    return (f'<table class="facts">{facts}</table>'
            f'<table class="facts"><tr><th>ms per item</th><th>median</th><th>p90</th><th>p99</th></tr>{times}'
            "</table>")


def charts_html(data: ReportData) -> str:
    cards = data.cards
    scores = [c.exit_score for c in cards if c.exit_score is not None]
    kept = [c.retained for c in cards if c.exit == "large" and c.retained is not None]
    total = [c.ms.get("total") for c in cards if c.error is None and c.ms.get("total") is not None]
    return (histogram(scores, "exit score", marker=data.threshold) + histogram(kept, "retained tokens (large calls)")
            + histogram(total, "time per item", unit=" ms"))


def build_html(data: ReportData, title: str) -> str:
    payload = {"cards": [dataclasses.asdict(c) for c in data.cards], "thumbs": data.thumbs, "page": PAGE}
    # `</` inside the JSON could end the script element early.
    blob = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in data.notes)
    return TEMPLATE.format(title=html.escape(title), style=STYLE, summary=summary_html(data),
                           charts=charts_html(data), notes=notes, data=blob, script=SCRIPT)


def write_report(data: ReportData, path: Path, title: str) -> int:
    text = build_html(data, title)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body>
<header><h1>{title}</h1>{notes}</header>
<section id="summary"><h2>Summary</h2><div class="row">{summary}</div></section>
<section id="charts"><h2>Charts</h2><div class="row">{charts}</div></section>
<section id="gallery"><h2>Items</h2>
<nav class="controls">
<span id="filters"><button data-filter="all">all</button><button data-filter="exited">exited</button><button
data-filter="large">large</button><button data-filter="wrong">wrong</button><button
data-filter="errors">errors</button></span>
<input id="search" type="search" placeholder="search id, question or answer">
<button id="prev">&larr;</button><span id="pager"></span><button id="next">&rarr;</button>
</nav>
<div id="cards"></div>
</section>
<pre id="js-errors"></pre>
<script type="application/json" id="data">{data}</script>
<script>{script}</script>
</body></html>
"""

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 24px 40px;color:#222;background:#fafafa}
h1{font-size:20px;margin:18px 0 6px}h2{font-size:16px;margin:22px 0 8px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.facts{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
.facts th,.facts td{padding:4px 10px;text-align:left;border-bottom:1px solid #eee}.facts td{text-align:right}
.chart{margin:0;background:#fff;padding:8px;box-shadow:0 1px 2px #0002}.chart figcaption{font-weight:600}
.bar{fill:#4a6fa5}.marker{stroke:#d33;stroke-width:2}.label{font-size:11px;fill:#555}
.muted{color:#888;font-weight:400}.note{color:#8a5a00;margin:4px 0}
.controls{display:flex;gap:8px;align-items:center;margin-bottom:10px;flex-wrap:wrap}
.controls button{border:1px solid #bbb;background:#fff;padding:3px 10px;border-radius:4px;cursor:pointer}
.controls button.on{background:#4a6fa5;color:#fff;border-color:#4a6fa5}#search{padding:4px 8px;min-width:260px}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
.card{background:#fff;box-shadow:0 1px 2px #0002;padding:10px;display:flex;gap:10px;border-left:4px solid #ccc}
.card.exit-small{border-left-color:#3a9d5d}.card.exit-large{border-left-color:#4a6fa5}.card.error{border-left-color:#d33}
.card.wrong{background:#fff6f6}.thumbs{display:flex;flex-direction:column;gap:4px}
.thumb{position:relative;width:128px;line-height:0}.thumb img{width:128px;height:auto;display:block}
.thumb svg{position:absolute;left:0;top:0;width:100%;height:100%}.thumb .none{width:128px;height:96px;
background:#eee;display:flex;align-items:center;justify-content:center;color:#999;line-height:1.2;font-size:12px}
.body{min-width:0;flex:1}.body .q{font-weight:600;word-wrap:break-word}.body .a{margin-top:4px;word-wrap:break-word}
.meta{color:#666;font-size:12px;margin-top:4px}.err{color:#b00;font-size:12px;word-wrap:break-word}
#js-errors:empty{display:none}#js-errors{color:#b00}
"""

SCRIPT = r"""
(function () {
  var errors = document.getElementById('js-errors');
  window.addEventListener('error', function (e) { errors.textContent += (e.message || e) + '\n'; });
  var data = JSON.parse(document.getElementById('data').textContent);
  var cards = data.cards, thumbs = data.thumbs, size = data.page;
  var state = {filter: 'all', q: '', page: 1};
  function readHash() {
    var h = new URLSearchParams(location.hash.slice(1));
    state.filter = h.get('filter') || 'all'; state.q = h.get('q') || ''; state.page = +(h.get('page') || 1);
  }
  function writeHash() {
    var h = new URLSearchParams({filter: state.filter, q: state.q, page: String(state.page)});
    history.replaceState(null, '', '#' + h.toString());
  }
  function wrong(c) { return c.correct !== null && c.correct < 0.5; }
  function keep(c) {
    if (state.filter === 'exited' && c.exit !== 'small') return false;
    if (state.filter === 'large' && c.exit !== 'large') return false;
    if (state.filter === 'wrong' && !wrong(c)) return false;
    if (state.filter === 'errors' && !c.error) return false;
    if (!state.q) return true;
    var q = state.q.toLowerCase();
    return [c.id, c.question, c.answer, c.small_answer, c.error].some(function (v) {
      return v !== null && v !== undefined && String(v).toLowerCase().indexOf(q) >= 0;
    });
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (ch) {
      return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[ch];
    });
  }
  function overlay(o) {
    if (!o) return '';
    var bits = atob(o.mask), rects = '';
    for (var r = 0; r < o.rows; r++) for (var c = 0; c < o.cols; c++) {
      var i = r * o.cols + c, kept = (bits.charCodeAt(i >> 3) >> (7 - (i & 7))) & 1;
      if (!kept) rects += '<rect x="' + c + '" y="' + r + '" width="1" height="1"/>';
    }
    return '<svg viewBox="0 0 ' + o.cols + ' ' + o.rows + '" preserveAspectRatio="none">' +
      '<g fill="#000" fill-opacity="0.55">' + rects + '</g></svg>';
  }
  function card(c) {
    var cls = 'card' + (c.error ? ' error' : ' exit-' + c.exit) + (wrong(c) ? ' wrong' : '');
    var imgs = c.images.map(function (k, i) {
      var src = thumbs[k];
      return '<div class="thumb">' + (src ? '<img alt="" src="' + src + '">' + overlay(c.overlays[i])
        : '<div class="none">no image</div>') + '</div>';
    }).join('') || '<div class="thumb"><div class="none">no image</div></div>';
    var body = '<div class="q">' + esc(c.question === null ? '(question unknown)' : c.question) + '</div>';
    if (c.error) body += '<div class="err">' + esc(c.error) + '</div>';
    else {
      body += '<div class="a">answer: <b>' + esc(c.answer) + '</b>' +
        (c.exit === 'large' && c.small_answer !== null ? ' <span class="muted">(small: ' + esc(c.small_answer) +
         ')</span>' : '') + '</div>';
      var meta = (c.exit === 'small' ? 'exited to small' : 'large model') +
        (c.exit_score !== null ? ', exit score ' + c.exit_score.toFixed(3) : '') +
        (c.exit === 'large' && c.visual ? ', kept ' + c.retained + ' of ' + c.visual + ' tokens' : '') +
        (c.ms.total !== undefined ? ', ' + c.ms.total.toFixed(0) + ' ms' : '');
      body += '<div class="meta">' + meta + '</div>';
      if (c.reference !== null) body += '<div class="meta">reference: ' + esc(JSON.stringify(c.reference)) +
        (c.correct !== null ? (c.correct >= 0.5 ? ' &#10003;' : ' &#10007;') : '') + '</div>';
    }
    return '<div class="' + cls + '" data-item-id="' + esc(c.id) + '"><div class="thumbs">' + imgs +
      '</div><div class="body"><div class="meta">#' + esc(c.id) + ' &middot; line ' + c.line + '</div>' + body +
      '</div></div>';
  }
  function render() {
    var shown = cards.filter(keep), pages = Math.max(1, Math.ceil(shown.length / size));
    state.page = Math.min(Math.max(1, state.page), pages);
    var slice = shown.slice((state.page - 1) * size, state.page * size);
    document.getElementById('cards').innerHTML = slice.map(card).join('');
    document.getElementById('pager').textContent = 'page ' + state.page + ' of ' + pages + ' (' + shown.length +
      ' of ' + cards.length + ' items)';
    Array.prototype.forEach.call(document.querySelectorAll('#filters button'), function (b) {
      b.className = b.getAttribute('data-filter') === state.filter ? 'on' : '';
    });
    document.getElementById('search').value = state.q;
    writeHash();
  }
  document.getElementById('filters').addEventListener('click', function (e) {
    var f = e.target.getAttribute && e.target.getAttribute('data-filter');
    if (f) { state.filter = f; state.page = 1; render(); }
  });
  document.getElementById('search').addEventListener('input', function (e) {
    state.q = e.target.value; state.page = 1; render();
  });
  document.getElementById('prev').addEventListener('click', function () { state.page -= 1; render(); });
  document.getElementById('next').addEventListener('click', function () { state.page += 1; render(); });
  window.addEventListener('hashchange', function () { readHash(); render(); });
  readHash();
  render();
})();
"""
