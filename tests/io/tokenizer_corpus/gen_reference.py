"""Writes the reference token ids the C++ tokenizer test compares against, using Hugging Face `tokenizers`.

Inputs: corpus.json (a JSON array of test strings, see make_corpus.py) and the Qwen3 tokenizer.json.
Outputs in --out:
  tiny_nfc.json, tiny_plain.json: small byte-level BPE tokenizers trained on the corpus, with added tokens
    that use lstrip/rstrip/single_word/normalized, ignore_merges, the GPT-2 ByteLevel regex and the
    merges-as-strings format; one has an NFC normalizer, the other none. They cover what Qwen3's file does not.
  reference.json: for each tokenizer, the sha256 of its file and, per corpus string, the ids from
    encode(add_special_tokens=False), the decode of those ids, and the decode with special tokens skipped.
Run it through gen_reference.sh, which pins the `tokenizers` version.
"""
import argparse
import hashlib
import json
import os

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers


def train_tiny(corpus, nfc):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken("[SPECIAL]", lstrip=True, rstrip=True, special=True, normalized=False)])
    tok.add_tokens([
        AddedToken("<word>", single_word=True, normalized=False),
        AddedToken("caf\u00e9", normalized=True),
        AddedToken("<a>", normalized=False),
        AddedToken("<ab>", normalized=False),
        AddedToken("hello world", normalized=True),
    ])
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = True
    # The older merges format ("a b" strings) is still what many published files use.
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"


def reference_for(path, corpus):
    tok = Tokenizer.from_file(path)
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    ids = [tok.encode(text, add_special_tokens=False).ids for text in corpus]
    return {
        "sha256": sha,
        "ids": ids,
        "decoded": [tok.decode(x, skip_special_tokens=False) for x in ids],
        "decoded_skip_special": [tok.decode(x, skip_special_tokens=True) for x in ids],
    }


def dump_reference(ref):
    # One corpus entry per line keeps the committed file reviewable.
    out = ['{\n "generator": %s,\n "tokenizers": {' % json.dumps("tokenizers " + tokenizers.__version__)]
    names = list(ref["tokenizers"])
    for n, name in enumerate(names):
        r = ref["tokenizers"][name]
        out.append('  %s: {\n   "sha256": %s,' % (json.dumps(name), json.dumps(r["sha256"])))
        for k, key in enumerate(["ids", "decoded", "decoded_skip_special"]):
            rows = ",\n    ".join(json.dumps(v, ensure_ascii=False) for v in r[key])
            out.append('   %s: [\n    %s\n   ]%s' % (json.dumps(key), rows, "," if k < 2 else ""))
        out.append("  }" + ("," if n + 1 < len(names) else ""))
    out.append(" }\n}\n")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen3", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(os.path.join(args.out, "corpus.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    files = {"qwen3": args.qwen3}
    for name, nfc in (("tiny_nfc", True), ("tiny_plain", False)):
        path = os.path.join(args.out, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(train_tiny(corpus, nfc))
        files[name] = path
    ref = {"tokenizers": {name: reference_for(path, corpus) for name, path in files.items()}}
    with open(os.path.join(args.out, "reference.json"), "w", encoding="utf-8") as f:
        f.write(dump_reference(ref))


if __name__ == "__main__":
    main()
