"""Cut the demo's pseudo-knowledge file, meg_harness/data/demo/counterfact_pseudo_knowledge.json, from the
workplace's counterfact-train.json (flattened CounterFact; see meg_harness/data/demo/README.md).

The cut: the first ``N`` records of the source, in its order, skipping every record that shares a subject
or a prompt (its prompt, rephrase or locality prompt) with any record of the demo's edit file
(counterfact_demo.json: its rewrite prompt, paraphrases and neighbourhood prompts). Written one record per
line, fields as in the source. tests/test_demo_config.py re-cuts it and compares when the source is present.

    python scripts/make_demo_pseudo_knowledge.py [SOURCE] [OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "meg_harness" / "data" / "demo"
SOURCE = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
OUT = DEMO / "counterfact_pseudo_knowledge.json"
N = 3000  # ~0.93 MB


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def demo_subjects_and_prompts(demo_file: Path = DEMO / "counterfact_demo.json") -> tuple[set[str], set[str]]:
    """The subjects and every prompt (rewrite, paraphrases, neighbourhood) of the demo's edit file."""
    subjects, prompts = set(), set()
    for record in json.loads(demo_file.read_text(encoding="utf-8")):
        rewrite = record["requested_rewrite"]
        subjects.add(_key(rewrite["subject"]))
        prompts.add(_key(rewrite["prompt"].format(rewrite["subject"])))
        prompts.update(_key(p) for p in record["paraphrase_prompts"] + record["neighborhood_prompts"])
    return subjects, prompts


def cut(source: Path = SOURCE, n: int = N) -> str:
    """The file's text: the first ``n`` source records that share no subject or prompt with the demo."""
    subjects, prompts = demo_subjects_and_prompts()
    kept = []
    for record in json.loads(source.read_text(encoding="utf-8")):
        texts = {_key(record[k]) for k in ("prompt", "rephrase_prompt", "locality_prompt")}
        if _key(record["subject"]) in subjects or texts & prompts:
            continue
        kept.append(record)
        if len(kept) == n:
            break
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in kept) + "\n]\n"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else SOURCE
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.write_text(cut(source), encoding="utf-8")
    print(f"{out}: {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
