"""Reference fixtures for the folder layouts users bring (no torch needed: transformers only).

Writes tests/fixtures/saved-today/{sd1,sd2}/tokenizer/ and saved-today/wuerstchen/{tokenizer,
prior_tokenizer}/: the tiny tokenizers of those fixtures loaded with transformers' CLIPTokenizer and written again by its `save_pretrained`, which
in transformers 5 writes `tokenizer.json` + `tokenizer_config.json` and no `vocab.json` /
`merges.txt` (the layout of a folder saved today). `cases.json` beside them holds the ids and masks
of the folder *as reloaded by transformers* on the same tricky prompts as the original references,
and the script asserts they equal the vocab.json/merges.txt layout's ids.

    pip install transformers==5.23.0 tokenizers==0.23.3
    python3 tests/make_fixtures_layouts.py
"""
import json
import shutil
import sys
from pathlib import Path

import tokenizers
import transformers
from transformers import CLIPTokenizer

FIX = Path(__file__).resolve().parent / "fixtures"
OUT = FIX / "saved-today"


def main():
    print("transformers", transformers.__version__, "tokenizers", tokenizers.__version__)
    sd1_cases = json.loads((FIX / "sd1" / "reference.json").read_text(encoding="utf-8"))["tokenizer_cases"]
    w = json.loads((FIX / "wuerstchen" / "reference.json").read_text(encoding="utf-8"))
    for name, folder in [("sd1", "tokenizer"), ("sd2", "tokenizer"),
                         ("wuerstchen", "tokenizer"), ("wuerstchen", "prior_tokenizer")]:
        if name.startswith("sd"):
            ref_cases = json.loads((FIX / name / "reference.json").read_text(encoding="utf-8"))["tokenizer_cases"]
        else:
            # Würstchen's references hold no tokenizer cases: the sd1 prompts and its own, with
            # the ids of its vocab.json / merges.txt folder.
            old = CLIPTokenizer.from_pretrained(FIX / name / folder)
            ref_cases = []
            for prompt in [c["prompt"] for c in sd1_cases] + [w["prompt"], w["negative_prompt"]]:
                enc = old(prompt, padding="max_length", max_length=old.model_max_length, truncation=True)
                ref_cases.append({"prompt": prompt, "ids": enc.input_ids, "mask": enc.attention_mask})
        ref = {"tokenizer_cases": ref_cases}
        prompts = [c["prompt"] for c in ref["tokenizer_cases"]]
        dest = OUT / name / folder
        if dest.exists():
            shutil.rmtree(dest)
        CLIPTokenizer.from_pretrained(FIX / name / folder).save_pretrained(dest)
        written = sorted(p.name for p in dest.iterdir())
        print(name, "save_pretrained wrote", written)
        assert "tokenizer.json" in written and "vocab.json" not in written, written
        tok = CLIPTokenizer.from_pretrained(dest)
        cases = []
        for case in ref["tokenizer_cases"]:
            enc = tok(case["prompt"], padding="max_length", max_length=tok.model_max_length,
                      truncation=True)
            assert enc.input_ids == case["ids"], (name, case["prompt"])
            assert enc.attention_mask == case["mask"], (name, case["prompt"])
            cases.append({"prompt": case["prompt"], "ids": enc.input_ids, "mask": enc.attention_mask})
        (dest / "cases.json").write_text(json.dumps({
            "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
            "files": written,
            "cases": cases,
        }, ensure_ascii=False, indent=1), encoding="utf-8")
        print(name, folder, len(prompts), "cases equal to the vocab.json/merges.txt layout")


if __name__ == "__main__":
    sys.exit(main())
