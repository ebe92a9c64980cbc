"""Tables from lm-eval results: general benchmarks (paper Table 3), UnKE (Table 17), MQuAKE (Table 18).

lm-eval reports fractions; these tables show percentages. Per evaluated edit (model, edit setting, method,
seed) and column, the newest results file that has the column counts; columns are then averaged over seeds
(mean ± sample std). MQuAKE and UnKE runs of ``meg-harness run`` count as results of ``mquake_ke`` /
``unke_ke`` (they give the same numbers).

Table 3 measures MMLU, RTE and SST-2 in one of two formulations: the paper's prompts scored on the
generated answer (``*_meg[_local]``), or lm-eval's standard loglikelihood multiple choice (``*_mc[_local]``,
or lm-eval's own ``mmlu``/``rte``/``sst2``). Per model and benchmark it shows one of them, labelled with
its formulation and shots: for models under :data:`SMALL_MODEL_PARAMETERS` the loglikelihood one (their
generated answers are at or below chance: measured on SmolLM2-135M, ``results/lm_eval_general/``), for
larger ones the paper's (comparable with its published numbers); the other when only it was measured.
A result over part of a task's documents (lm-eval's ``--limit`` or ``--samples``, recorded in its
``n-samples``) shares a row only with results over equally many documents, and the row says how many.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meg_harness.report.lmeval_results import EvalResult, recency_key
from meg_harness.report.markdown import file_part, metric_cells, paper_cells, paper_label, pipe_table, section
from meg_harness.report.outputs import Built, Skipped, markdown_output
from meg_harness.report.paper import method_title, paper_columns, paper_row
from meg_harness.report.results import UNEDITED, best_values

GENERAL = "Table 3 (general benchmarks: unedited vs edited)"
UNKE = "Table 17 (UnKEBench)"
MQUAKE = "Table 18 (MQuAKE)"
GENERATION, LOGLIKELIHOOD, CHAT = "generation", "loglikelihood", "chat"  # CHAT: generation, chat template
# benchmark -> (title, {formulation: lm-eval tasks that measure it, most preferred first})
BENCHMARKS = {
    "bbh": ("BBH", {GENERATION: ("bbh_meg", "bbh_meg_local", "bbh")}),
    "gsm8k": ("GSM8K", {GENERATION: ("gsm8k_meg", "gsm8k_meg_local", "gsm8k")}),
    "mmlu": (
        "MMLU",
        {GENERATION: ("mmlu_meg", "mmlu_meg_local"), LOGLIKELIHOOD: ("mmlu_mc", "mmlu_mc_local", "mmlu")},
    ),
    "rte": (
        "RTE",
        {GENERATION: ("rte_meg", "rte_meg_local"), LOGLIKELIHOOD: ("rte_mc", "rte_mc_local", "rte")},
    ),
    "sst2": (
        "SST-2",
        {GENERATION: ("sst2_meg", "sst2_meg_local"), LOGLIKELIHOOD: ("sst2_mc", "sst2_mc_local", "sst2")},
    ),
}
# the shots inside the paper's prompts (chain-of-thought-hub: MMLU 5 of the subject, BBH 3 CoT; Table 23)
PAPER_PROMPT_SHOTS = {"bbh": 3, "gsm8k": 0, "mmlu": 5, "rte": 0, "sst2": 0}
SMALL_MODEL_PARAMETERS = 1_000_000_000  # below: Table 3 prefers the loglikelihood formulation
FORMULATION_TITLES = {
    GENERATION: "paper prompt, generated answer",
    LOGLIKELIHOOD: "loglikelihood",
    CHAT: "paper prompt in the chat template, generated answer",
}
BENCHMARK_METRICS = ("acc,none", "exact_match,none", "exact_match,strict-match", "exact_match,get-answer")
MQUAKE_COLUMNS = {"edit_wise": "Edit-wise", "instance_wise": "Instance-wise", "multi_hop": "Multi-hop"}
UNKE_COLUMNS = {
    "reliability_bert_score": "Rel Bert Score",
    "reliability_rougeL": "Rel ROUGE-L recall",
    "generality_bert_score": "Gen Bert Score",
    "generality_rougeL": "Gen ROUGE-L recall",
}
LEGEND = (
    "Percentages (lm-eval's fractions × 100); mean ± sample std over the seeds of an edit where several were "
    "evaluated. **Bold**: best edited method. Rows marked ↳ paper hold the paper's published numbers for "
    "the same model, edit setting and method (in italics): not our results."
)
Extract = Callable[[EvalResult], dict[str, tuple[float, str]]]  # column -> (percentage, task/metric)


@dataclass(frozen=True)
class EvalRow:
    model: str
    dataset: str | None
    n_edits: int | None
    method: str
    values: dict[str, float]
    stds: dict[str, float]
    seeds: int
    sources: dict[str, frozenset[str]]  # column -> the task/metric names it came from
    edits: str = ""  # the run's data file and index range ("" when unknown)

    @property
    def edit(self) -> str:
        """``mquake, 116 edits · MQuAKE-hard.json [300, 429)``; the unedited model: ``–`` and, when a run
        names them, the cases it was scored on."""
        if self.method == UNEDITED:
            return f"– · {self.edits}, {self.n_edits} cases" if self.edits and self.n_edits else "–"
        edit = f"{self.dataset or '?'}, {self.n_edits if self.n_edits is not None else '?'} edits"
        return f"{edit} · {self.edits}" if self.edits else edit


def aggregate(results: Sequence[EvalResult], extract: Extract) -> list[EvalRow]:
    """One row per (model, edit setting, method): columns averaged over seeds (newest file per seed)."""
    latest: dict[tuple, dict[str, tuple[float, str]]] = {}
    for result in sorted(results, key=recency_key):
        key = (result.model, result.dataset, result.n_edits, result.edits, result.method, result.seed)
        latest.setdefault(key, {}).update(extract(result))
    grouped: dict[tuple, list[dict[str, tuple[float, str]]]] = {}
    for (model, dataset, n_edits, edits, method, _seed), columns in latest.items():
        if columns:
            grouped.setdefault((model, dataset, n_edits, edits, method), []).append(columns)
    rows = []
    for (model, dataset, n_edits, edits, method), per_seed in grouped.items():
        values, stds, sources = {}, {}, {}
        for column in sorted({c for seed in per_seed for c in seed}):
            present = [seed[column] for seed in per_seed if column in seed]
            numbers = [value for value, _ in present]
            values[column] = math.fsum(numbers) / len(numbers)
            stds[column] = statistics.stdev(numbers) if len(numbers) > 1 else math.nan
            sources[column] = frozenset(source for _, source in present)
        rows.append(EvalRow(model, dataset, n_edits, method, values, stds, len(per_seed), sources, edits))
    return sorted(rows, key=lambda r: (r.model, *_setting_order(r), r.method != UNEDITED, r.method))


def _setting_order(row: EvalRow) -> tuple[str, int, str]:
    return (row.dataset or "", row.n_edits or 0, row.edits)


def _percent(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return 100.0 * float(value)


def task_columns(task: str, columns: Sequence[str]) -> Extract:
    """Extractor of ``columns`` (metric names, filter ``none``) of one lm-eval task."""

    def extract(result: EvalResult) -> dict[str, tuple[float, str]]:
        metrics = result.results.get(task, {})
        found = {c: _percent(metrics.get(f"{c},none")) for c in columns}
        return {c: (v, f"{task} {c},none") for c, v in found.items() if v is not None}

    return extract


ALL_DOCUMENTS = "all"


def column_key(benchmark: str, formulation: str, shots: int, documents: str = ALL_DOCUMENTS) -> str:
    """A Table 3 column of one benchmark in one formulation, shot count and number of documents, e.g.
    ``mmlu|loglikelihood|0|all`` or ``bbh|generation|3|27/6511`` (27 of the task's 6511 documents scored):
    only results over equally many documents share a row."""
    return f"{benchmark}|{formulation}|{shots}|{documents}"


def _documents(result: EvalResult, task: str) -> str:
    scored, total = result.documents.get(task, (0, 0))
    return f"{scored}/{total}" if 0 < scored < total else ALL_DOCUMENTS


def benchmark_columns(result: EvalResult) -> dict[str, tuple[float, str]]:
    """Per benchmark and formulation, the first of its tasks (and of :data:`BENCHMARK_METRICS`) present in
    ``result``, keyed by :func:`column_key` (the shots: inside the paper's prompts, else lm-eval's)."""
    found = {}
    for benchmark, (_title, formulations) in BENCHMARKS.items():
        for formulation, tasks in formulations.items():
            for task in tasks:
                metrics = result.results.get(task, {})
                metric = next((m for m in BENCHMARK_METRICS if _percent(metrics.get(m)) is not None), None)
                if metric is not None:
                    own = task.endswith(("_meg", "_meg_local"))
                    shots = PAPER_PROMPT_SHOTS[benchmark] if own else int(result.n_shot.get(task, 0))
                    chat = formulation == GENERATION and result.chat_template
                    kind = CHAT if chat else formulation
                    key = column_key(benchmark, kind, shots, _documents(result, task))
                    found[key] = (_percent(metrics[metric]), f"{task} {metric}")
                    break
    return found


def choose_formulations(rows: Sequence[EvalRow], parameters: int | None) -> dict[str, str]:
    """Per benchmark, the column (:func:`column_key`) a model's Table 3 shows: the loglikelihood formulation
    first for a model under :data:`SMALL_MODEL_PARAMETERS`, the paper's prompts first otherwise (also when
    the size is unknown); within one, the column most rows have, then the fewest shots."""
    small = parameters is not None and parameters < SMALL_MODEL_PARAMETERS
    order = (LOGLIKELIHOOD, GENERATION, CHAT) if small else (GENERATION, LOGLIKELIHOOD, CHAT)
    chosen = {}
    for benchmark in BENCHMARKS:
        present = {k for r in rows for k in r.values if k.split("|")[0] == benchmark}
        if not present:
            continue

        def rank(key: str) -> tuple[int, int, int, bool]:
            _, formulation, shots, documents = key.split("|")
            complete = documents == ALL_DOCUMENTS
            return (order.index(formulation), -sum(key in r.values for r in rows), int(shots), not complete)

        chosen[benchmark] = min(present, key=rank)
    return chosen


def formulation_label(key: str) -> str:
    """``loglikelihood, 0-shot`` for :func:`column_key` ``mmlu|loglikelihood|0|all``; ``paper prompt,
    generated answer, 3-shot, 27 of 6511 documents`` for ``bbh|generation|3|27/6511``."""
    _, formulation, shots, documents = key.split("|")
    label = f"{FORMULATION_TITLES[formulation]}, {shots}-shot"
    if documents != ALL_DOCUMENTS:
        scored, total = documents.split("/")
        label += f", {scored} of {total} documents"
    return label


def _sources_note(rows: Sequence[EvalRow], titles: Mapping[str, str]) -> str:
    used = {c: sorted(set().union(*(r.sources.get(c, frozenset()) for r in rows))) for c in titles}
    return "Measured by: " + "; ".join(f"{titles[c]}: {', '.join(s)}" for c, s in used.items() if s) + "."


def general_tables(results: Sequence[EvalResult]) -> Built:
    """Per model: benchmarks as rows, the unedited model and each evaluated edit as columns (Table 3)."""
    rows = aggregate(results, benchmark_columns)
    if not rows:
        tasks = ", ".join(t for _title, f in BENCHMARKS.values() for tasks in f.values() for t in tasks[:1])
        return [Skipped(GENERAL, f"no lm-eval results of the general benchmarks ({tasks}, ...)")]
    outputs = []
    for model in sorted({r.model for r in rows}):
        lines = []
        mine = [r for r in rows if r.model == model]
        sizes = [r.parameters for r in results if r.model == model and r.parameters]
        chosen = choose_formulations(mine, max(sizes) if sizes else None)
        settings = sorted({_setting_order(r) for r in mine if r.method != UNEDITED})
        for setting in settings or [("", 0, "")]:
            columns = [r for r in mine if r.method == UNEDITED or _setting_order(r) == setting]
            lines += _general_section(model, setting, columns, chosen, max(sizes) if sizes else None)
        title = f"General benchmarks after editing: {model}"
        outputs.append(markdown_output(f"general_{file_part(model)}.md", title, lines))
    return outputs


def _general_section(
    model: str,
    setting: tuple[str, int, str],
    columns: list[EvalRow],
    chosen: Mapping[str, str],
    parameters: int | None,
) -> list[str]:
    dataset, n_edits, edits = setting
    keys = {b: chosen.get(b, column_key(b, GENERATION, PAPER_PROMPT_SHOTS[b])) for b in BENCHMARKS}
    titles = {key: f"{BENCHMARKS[b][0]} ({formulation_label(key)})" for b, key in keys.items()}
    header = ["Task", *(method_title(c.method) if c.method == UNEDITED else c.method for c in columns)]
    papers = [paper_row("general", model, dataset or None, n_edits or None, c.method) for c in columns]
    body = []
    for benchmark, key in keys.items():  # the methods (columns) compete for the best value of a row
        best = best_values(columns, [key])
        body.append([titles[key], *(metric_cells(c, c.stds, [key], best, len(columns))[0] for c in columns)])
        if any(papers) and key.split("|")[1] == GENERATION:  # the paper scored generated answers
            table_id = next(p.table for p in papers if p)
            body.append(
                [f"↳ paper ({table_id})", *(paper_cells(p, [benchmark])[0] if p else "–" for p in papers)]
            )
    edited = any(c.method != UNEDITED for c in columns)
    edit = f"{dataset or '?'}, {n_edits or '?'} edits" if edited else "no edited model evaluated"
    edit += f" · {edits}" if edited and edits else ""
    size = f"{parameters / 1e9:.2f}B parameters" if parameters else "size unknown"
    rule = (
        f"Formulation per benchmark ({size}): below {SMALL_MODEL_PARAMETERS / 1e9:g}B parameters lm-eval's "
        "loglikelihood multiple choice where measured (a small model's generated answers are at or below "
        "chance, results/lm_eval_general/README.md), else the paper's prompts scored on the generated answer "
        "(Table 23, chain-of-thought-hub); the row names the one shown and its shots."
    )
    notes = [f"Edits: {edit}. Layout of the paper's Table 3 (Phi-2 after 10000 ZsRE edits).", rule, LEGEND]
    notes.append(_sources_note(columns, titles))
    return section(f"{model} · {edit}", notes, pipe_table(header, body))


def _per_row_tables(
    results: Sequence[EvalResult], title: str, task: str, columns: Mapping[str, str], kind: str, name: str
) -> Built:
    """One table per model: a row per (edit setting, method), the paper's row after a matching one."""
    rows = aggregate(results, task_columns(task, list(columns)))
    if not rows:
        return [Skipped(title, f"no lm-eval results of the task {task}")]
    extra = {k: f"{k.upper()} (paper's measure)" for k in paper_columns(kind) if k not in columns}
    keys = [*columns, *extra]
    header = ["Method", "Edits", *columns.values(), *extra.values(), "Seeds"]
    lines = []
    for model in sorted({r.model for r in rows}):
        body = []
        mine = [r for r in rows if r.model == model]
        for _setting, group in itertools.groupby(mine, _setting_order):
            group = list(group)
            best = best_values(group, list(columns))
            for row in group:
                body.append(
                    [
                        row.method,
                        row.edit,
                        *metric_cells(row, row.stds, keys, best, len(group)),
                        str(row.seeds),
                    ]
                )
                paper = paper_row(kind, model, row.dataset, row.n_edits, row.method)
                if paper is not None:
                    body.append([paper_label(paper), row.edit, *paper_cells(paper, keys), "–"])
        lines += section(model, [LEGEND], pipe_table(header, body, text_columns=2))
    return [markdown_output(name, title, lines)]


def mquake_tables(results: Sequence[EvalResult]) -> Built:
    """Paper Table 18: edit-wise, instance-wise and multi-hop accuracy (task ``mquake_ke``)."""
    return _per_row_tables(results, MQUAKE, "mquake_ke", MQUAKE_COLUMNS, "mquake", "mquake.md")


def unke_tables(results: Sequence[EvalResult]) -> Built:
    """Paper Table 17: ROUGE-L and semantic similarity of long answers (task ``unke_ke``)."""
    return _per_row_tables(results, UNKE, "unke_ke", UNKE_COLUMNS, "unke", "unke.md")
