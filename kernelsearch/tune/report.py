"""``kernelsearch report SPEC``: plots of a spec's tuning studies, as PNG files and one HTML page.

For every study of the spec (same sha256) found in the storage:

- ``<slug>-history.png``: time of every evaluated config in trial order (log scale), failures
  marked by kind at the top, and the best time so far;
- ``<slug>-importance.png``: how much of the variance of log(time) each knob explains on its
  own (its main effect: the variance of the per-choice means, weighted by counts, over the
  total variance) -- dependency-free and honest about what it is;
- ``<slug>-configs.png``: time per config, sorted, the default config highlighted;
- ``index.html``: all of it with the top configs and the failures (kind and reason) per study.

Matplotlib with the Agg backend; no display needed.
"""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .space import config_key

__all__ = ["write_report", "find_studies", "main_effects"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:120]


def find_studies(storage: Any, sha256: str) -> list[str]:
    import optuna

    names = optuna.study.get_all_study_names(storage=storage)
    tag = f"|{sha256[:16]}|"
    return sorted(n for n in names if tag in n)


def _trials(study: Any) -> tuple[list, list]:
    from optuna.trial import TrialState

    ok, failed = [], []
    for t in study.get_trials(deepcopy=False):
        ks = t.user_attrs.get("ks") or {}
        if not ks.get("counted"):
            continue
        if t.state == TrialState.COMPLETE and t.value is not None:
            ok.append(t)
        elif t.state == TrialState.FAIL:
            failed.append(t)
    return ok, failed


def main_effects(configs: list[dict], times: list[float]) -> dict[str, float]:
    """Share of the variance of log(time) explained by each knob's main effect."""
    if len(times) < 3:
        return {}
    y = [math.log(t) for t in times]
    mean = sum(y) / len(y)
    total = sum((v - mean) ** 2 for v in y) / len(y)
    if total <= 0:
        return {}
    names = sorted({k for c in configs for k in c})
    out = {}
    for n in names:
        groups: dict[str, list[float]] = {}
        for c, v in zip(configs, y):
            groups.setdefault(repr(c.get(n, "-")), []).append(v)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values()) / len(y)
        out[n] = between / total
    return out


def _plots(study: Any, out_dir: Path, slug: str) -> tuple[list[Path], dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok, failed = _trials(study)
    meta = study.user_attrs.get("ks_meta") or {}
    default_key = config_key(meta.get("default") or {})
    files: list[Path] = []
    info: dict = {"ok": ok, "failed": failed, "meta": meta}

    # history
    fig, ax = plt.subplots(figsize=(8, 4.2))
    if ok:
        xs = [t.number for t in ok]
        ys = [t.value for t in ok]
        ax.scatter(xs, ys, s=18, label="evaluated config", color="#1f77b4")
        best, bx, by = math.inf, [], []
        for t in sorted(ok, key=lambda t: t.number):
            best = min(best, t.value)
            bx.append(t.number)
            by.append(best)
        ax.step(bx, by, where="post", color="#d62728", label="best so far")
        ax.set_yscale("log")
        top = max(ys) * 1.3
        kinds = sorted({(t.user_attrs.get("ks") or {}).get("kind", "fail") for t in failed})
        markers = "xv^<>sdP*"
        for i, kd in enumerate(kinds):
            fx = [t.number for t in failed if (t.user_attrs.get("ks") or {}).get("kind", "fail") == kd]
            ax.scatter(fx, [top] * len(fx), marker=markers[i % len(markers)], s=30, label=f"failed: {kd}")
    ax.set_xlabel("trial")
    ax.set_ylabel("median time (ms)")
    ax.set_title(f"{meta.get('spec_name', '')} {meta.get('bucket', '')} {meta.get('dtype', '')} "
                 f"{meta.get('direction', '')}: search history", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = out_dir / f"{slug}-history.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    # importances
    eff = main_effects([(t.user_attrs.get("ks") or {}).get("config", t.params) for t in ok], [t.value for t in ok])
    info["importance"] = eff
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(eff))))
    if eff:
        names = sorted(eff, key=eff.get)
        ax.barh(names, [eff[n] for n in names], color="#2ca02c")
        ax.set_xlim(0, 1)
    else:
        ax.text(0.5, 0.5, "not enough evaluated configs", ha="center", va="center")
    ax.set_xlabel("share of variance of log(time) explained (main effect)")
    ax.set_title("parameter importance", fontsize=9)
    fig.tight_layout()
    p = out_dir / f"{slug}-importance.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    # time per config
    best_per: dict[str, Any] = {}
    for t in ok:
        k = (t.user_attrs.get("ks_run") or {}).get("key") or config_key(t.params)
        if k not in best_per or t.value < best_per[k].value:
            best_per[k] = t
    rows = sorted(best_per.items(), key=lambda kv: kv[1].value)[:60]
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.22 * max(1, len(rows))))
    if rows:
        labels = [", ".join(f"{a}={b}" for a, b in json.loads(k).items()) for k, _ in rows]
        colors = ["#ff7f0e" if k == default_key else "#1f77b4" for k, _ in rows]
        ax.barh(range(len(rows)), [t.value for _, t in rows], color=colors)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
    ax.set_xlabel("median time (ms); orange = default config")
    ax.set_title("time per config", fontsize=9)
    fig.tight_layout()
    p = out_dir / f"{slug}-configs.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    info["rows"] = rows
    return files, info


def write_report(spec_path: str | None, *, storage: str | None = None, out_dir: str | None = None,
                 adapter: Any = None) -> list[Path]:
    """Write the plots and index.html; returns the files written. ``adapter``: the target whose
    spec the studies are of (adapter.py; default kernelsearch's, reading ``spec_path``)."""
    from .adapter import KernelsearchTarget
    from .storage import open_storage, parse_storage

    if adapter is None:
        if not spec_path or not Path(spec_path).is_file():
            raise UsageError(f"spec file not found: {spec_path}")
        adapter = KernelsearchTarget("torch")   # any backend: only the spec is read
    spec, _ = adapter.load_spec(spec_path, {})
    cfg = parse_storage(storage)
    if cfg.kind == "sqlite" and cfg.path is not None and not cfg.path.exists():
        raise UsageError(f"no tuning database at {cfg.display}; run kernelsearch tune first")
    st = open_storage(cfg)
    names = find_studies(st, spec.sha256)
    if not names:
        raise UsageError(f"no tuning study of {spec.name} (sha256 {spec.sha256[:16]}) in {cfg.display}; "
                         "run kernelsearch tune first")
    import optuna

    out = Path(out_dir) if out_dir else Path("kernelsearch-report") / spec.name
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>kernelsearch report: "
             f"{html.escape(spec.name)}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}"
             f"table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}"
             f"img{{max-width:100%}}</style></head><body><h1>{html.escape(spec.name)}</h1>"
             f"<p>spec sha256 {spec.sha256}<br>storage {html.escape(cfg.display)}</p>"]
    for name in names:
        study = optuna.load_study(study_name=name, storage=st)
        slug = _slug(name)
        pngs, info = _plots(study, out, slug)
        files += pngs
        meta = info["meta"]
        parts.append(f"<h2>{html.escape(name)}</h2><p>{len(info['ok'])} configs ok, {len(info['failed'])} failed; "
                     f"sizes {html.escape(json.dumps(meta.get('sizes')))}, default {html.escape(repr(meta.get('default')))}</p>")
        final = study.user_attrs.get("ks_final") or {}
        if final.get("rows"):
            parts.append("<h3>top configs (re-timed)</h3><table><tr><th>median ms</th><th>spread</th>"
                         "<th>speedup</th><th>compile s</th><th>config</th></tr>")
            for r in final["rows"]:
                sp, su, cs = r.get("spread"), r.get("speedup"), r.get("compile_s")
                sp_s = "" if sp is None else "±%.1f%%" % (100 * sp)
                su_s = "" if not su else "%.2fx" % su
                cs_s = "" if cs is None else "%.2f" % cs
                parts.append(f"<tr><td>{r['median_ms']:.4g}</td><td>{sp_s}</td><td>{su_s}</td><td>{cs_s}</td>"
                             f"<td><code>{html.escape(repr(r['config']))}</code></td></tr>")
            parts.append("</table>")
        for p in pngs:
            parts.append(f"<p><img src='{html.escape(p.name)}'></p>")
        if info["failed"]:
            parts.append("<h3>failed configs</h3><table><tr><th>trial</th><th>kind</th><th>config</th><th>reason</th></tr>")
            for t in info["failed"]:
                ks = t.user_attrs.get("ks") or {}
                parts.append(f"<tr><td>{t.number}</td><td>{html.escape(str(ks.get('kind')))}</td>"
                             f"<td><code>{html.escape(repr(ks.get('config', t.params)))}</code></td>"
                             f"<td>{html.escape(str(ks.get('reason', ''))[:500])}</td></tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    files.append(index)
    return files
