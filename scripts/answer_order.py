"""Rewrite an SFT file's answers with some keys first (an experiment on what the model predicts from).

JSON objects compare without order, so the answers stay the same requests; only the order in
which the model writes their fields changes.

    python scripts/answer_order.py data/large_sft.jsonl OUT.jsonl --first qosProfile duration
"""

from __future__ import annotations

import argparse
import json

from qod_lightning.data.jsonl import read_jsonl
from qod_lightning.data.prompts import dump_request
from qod_lightning.data.sft import SFT_RECORD


def main() -> None:
    """Read, reorder, write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("output")
    parser.add_argument("--first", nargs="+", required=True, help="keys to write first, in this order")
    args = parser.parse_args()
    with open(args.output, "w", encoding="utf-8") as out:
        for record in read_jsonl(args.source, SFT_RECORD):
            answer = json.loads(record["response"])
            first = {key: answer[key] for key in args.first if key in answer}
            reordered = {**first, **{k: v for k, v in answer.items() if k not in first}}
            row = {key: record[key] for key in SFT_RECORD} | {"response": dump_request(reordered)}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
