"""The user study's report: per pair and question, preference shares with intervals
and tests (`study/stats.py`), attention-check failures and self-consistency."""

from __future__ import annotations

import math

import numpy as np

from personalize.study import stats as st
from personalize.study.layout import QUESTION_LABEL, QUESTION_TEXT
from personalize.study.store import QUESTIONS


def _finite(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def make_report(study: dict, answers: list[dict], *, exclude=(), max_failures: int = 0, resamples: int = 2000,
                seed: int = 0, prior: float = 0.1) -> dict:
    """Every number of the report, from tasks.json's content and the stored answers."""

    tasks = {t["id"]: t for t in study["tasks"]}
    answers = [a for a in answers if a["task"] in tasks]
    everyone = sorted({a["participant"] for a in answers})

    # 1. quality control: attention checks, and anyone excluded by hand
    checks = {}
    for a in answers:
        t = tasks[a["task"]]
        if t["kind"] == "attention":
            c = checks.setdefault(a["participant"], [0, 0])
            c[0] += 1
            c[1] += any(a[f"q_{q}"] != side for q, side in (t["expected"] or {}).items())
    excluded = {}
    for p, (n, failed) in checks.items():
        if failed > max_failures:
            excluded[p] = f"failed {failed} of {n} attention check(s)"
    for p in exclude:
        excluded.setdefault(p, "excluded by hand")
    kept = [a for a in answers if a["participant"] not in excluded]

    def outcome(a, q):
        """The method whose image was chosen, None for "Can't decide"."""
        v = a[f"q_{q}"]
        return None if v == "cant_decide" else a["method_1"] if v == "1" else a["method_2"]

    # 2. per pair and question: shares, win rate, Wilson on the decisive answers, bootstrap
    pairs = [tuple(p) for p in study["pairs"]]
    rows = []
    for k, (a_, b_) in enumerate(pairs):
        mine = [a for a in kept if tasks[a["task"]]["kind"] == "pair" and tuple(tasks[a["task"]]["pair"]) == (a_, b_)]
        people = sorted({a["participant"] for a in mine})
        index = {p: i for i, p in enumerate(people)}
        for j, q in enumerate(QUESTIONS):
            counts = np.zeros((len(people), 3))
            for a in mine:
                chosen = outcome(a, q)
                counts[index[a["participant"]], 2 if chosen is None else 0 if chosen == a_ else 1] += 1
            w, l, t = counts.sum(axis=0) if len(people) else (0.0, 0.0, 0.0)
            n = w + l + t
            rows.append({
                "a": a_, "b": b_, "question": q, "answers": int(n), "participants": len(people),
                "wins": int(w), "losses": int(l), "ties": int(t),
                "win_share": _finite(w / n if n else math.nan), "loss_share": _finite(l / n if n else math.nan),
                "tie_share": _finite(t / n if n else math.nan), "win_rate": _finite(st.win_rate(w, l, t)),
                "decisive_win_rate": _finite(w / (w + l) if w + l else math.nan),
                "wilson_95": [_finite(x) for x in st.wilson(w, w + l)],
                "bootstrap_95": [_finite(x) for x in st.cluster_bootstrap(
                    counts, resamples=resamples, seed=np.random.default_rng([seed, k, j]))],
            })

    # 3. Bradley-Terry over all methods, per question (ties: half a win each)
    names = list(study["methods"])
    pos = {m: i for i, m in enumerate(names)}
    ranking = {}
    for q in QUESTIONS:
        wins = np.zeros((len(names), len(names)))
        for a in kept:
            t = tasks[a["task"]]
            if t["kind"] != "pair":
                continue
            x, y = pos[t["pair"][0]], pos[t["pair"][1]]
            chosen = outcome(a, q)
            if chosen is None:
                wins[x, y] += 0.5
                wins[y, x] += 0.5
            else:
                winner, loser = (x, y) if chosen == t["pair"][0] else (y, x)
                wins[winner, loser] += 1
        strength = st.bradley_terry(wins, prior=prior)
        order = sorted((i for i in range(len(names)) if not math.isnan(strength[i])), key=lambda i: -strength[i])
        ranking[q] = {"connected": st.connected(wins > 0), "prior_wins": prior, "methods": [
            {"rank": r + 1, "method": names[i], "strength": _finite(strength[i]),
             "log_strength": _finite(math.log(strength[i]) - float(np.mean(np.log(strength[order]))))}
            for r, i in enumerate(order)]}

    # 4. position bias (image 1 vs image 2) over all compared pairs, repeats included
    compared = [a for a in kept if tasks[a["task"]]["kind"] in ("pair", "repeat")]
    bias = {}
    for q in QUESTIONS:
        ones = sum(a[f"q_{q}"] == "1" for a in compared)
        twos = sum(a[f"q_{q}"] == "2" for a in compared)
        bias[q] = {"image_1": ones, "image_2": twos, "cant_decide": len(compared) - ones - twos,
                   "share_image_1": _finite(ones / (ones + twos) if ones + twos else math.nan),
                   "wilson_95": [_finite(x) for x in st.wilson(ones, ones + twos)],
                   "p_value": _finite(st.binomial_p_value(ones, ones + twos))}

    # 5. self-consistency: a repeated pair answered by the one who answered the original
    by_key = {(a["participant"], a["task"]): a for a in kept}
    consistency = {}
    for q in QUESTIONS:
        first, second = [], []
        for a in kept:
            t = tasks[a["task"]]
            if t["kind"] == "repeat" and (a["participant"], t["repeat_of"]) in by_key:
                first.append(outcome(by_key[(a["participant"], t["repeat_of"])], q))
                second.append(outcome(a, q))
        same, n = st.agreement(first, second)
        consistency[q] = {"repeats": n, "same": same, "share": _finite(same / n if n else math.nan)}

    return {
        "answers": len(answers), "participants": len(everyone),
        "included": {"answers": len(kept), "participants": len({a["participant"] for a in kept})},
        "excluded": [{"participant": p, "reason": r} for p, r in sorted(excluded.items())],
        "attention_checks": {p: {"answered": n, "failed": f} for p, (n, f) in sorted(checks.items())},
        "questions": dict(QUESTION_TEXT), "pairs": rows, "bradley_terry": ranking,
        "position_bias": bias, "self_consistency": consistency,
        "settings": {"max_failures": max_failures, "bootstrap_resamples": resamples, "seed": seed},
        "random_weights": bool(study.get("random_weights")),
    }


def _interval(pair) -> str:
    lo, hi = pair
    return "   n/a      " if lo is None else f"[{lo:.2f}, {hi:.2f}]"


def _num(x, fmt=".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_report(r: dict) -> str:
    """The report as text: per pair and question, Table 1, rankings, quality control."""
    lines = [(f"{r['answers']} answers from {r['participants']} participant(s); counted: "
              f"{r['included']['answers']} from {r['included']['participants']}")]
    for e in r["excluded"]:
        lines.append(f"  excluded {e['participant']}: {e['reason']}")
    if r.get("random_weights"):
        lines.append("  (images from the offline demo model: random weights)")
    lines.append("")
    lines.append(f"{'A vs B':<34} {'q':<4} {'n':>5} {'win':>5} {'loss':>5} {'tie':>5} {'win rate':>8}  "
                 f"{'Wilson 95% (decisive)':<22} bootstrap 95% (by participant)")
    for p in r["pairs"]:
        lines.append(f"{p['a'] + ' vs ' + p['b']:<34} {QUESTION_LABEL[p['question']]:<4} {p['answers']:>5} "
                     f"{_num(p['win_share']):>5} {_num(p['loss_share']):>5} {_num(p['tie_share']):>5} "
                     f"{_num(p['win_rate']):>8}  {_num(p['decisive_win_rate'])} {_interval(p['wilson_95']):<17} "
                     f"{_interval(p['bootstrap_95'])}")
    # Table 1: one column per pair, one row per question
    heads = [f"{p['a']} vs {p['b']}" for p in r["pairs"] if p["question"] == QUESTIONS[0]]
    width = max([12] + [len(h) for h in heads])
    lines += ["", "Table 1: win rate of A (ties as half)", " " * 5 + "".join(f"{h:>{width + 2}}" for h in heads)]
    for q in QUESTIONS:
        cells = [_num(p["win_rate"]) for p in r["pairs"] if p["question"] == q]
        lines.append(f"{QUESTION_LABEL[q]:<5}" + "".join(f"{c:>{width + 2}}" for c in cells))
    lines += ["", "Bradley-Terry ranking (strengths sum to 1)"]
    for q in QUESTIONS:
        bt = r["bradley_terry"][q]
        text = "  ".join(f"{m['rank']}. {m['method']} {_num(m['strength'], '.3f')}" for m in bt["methods"])
        lines.append(f"  {QUESTION_LABEL[q]:<4} {text or 'no answers'}" +
                     ("" if bt["connected"] else "  (comparison graph not connected: scales not comparable)"))
    lines += ["", "Position bias: share choosing image 1 among decisive answers (0.50 = none)"]
    for q in QUESTIONS:
        b = r["position_bias"][q]
        lines.append(f"  {QUESTION_LABEL[q]:<4} {_num(b['share_image_1'])} {_interval(b['wilson_95'])} "
                     f"p = {_num(b['p_value'], '.3g')}  ({b['image_1']} vs {b['image_2']})")
    lines += ["", "Self-consistency on repeated pairs (same choice twice)"]
    for q in QUESTIONS:
        c = r["self_consistency"][q]
        lines.append(f"  {QUESTION_LABEL[q]:<4} {_num(c['share'])} ({c['same']} of {c['repeats']})")
    return "\n".join(lines)
