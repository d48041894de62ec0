"""Load an `lmfab export hf` folder with transformers alone and continue a prompt greedily.

    python examples/hf_generate.py runs/exports/demo/hf "ROMEO." [--max-new-tokens 40]

No lmfab import: this is what a user of the exported model runs.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.folder)
    model = AutoModelForCausalLM.from_pretrained(a.folder)
    ids = tok(a.prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=a.max_new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    print(f"transformers ({type(model).__name__}): {tok.decode(out[0])}")


if __name__ == "__main__":
    main()
